package RunnerHelper;

# Helpers for the self-tests of t/lib/Test/Nginx/Socket.pm: write a small
# Test::Nginx .t file into a temp dir, run it in a subprocess (with its own
# port and servroot, never t/servroot) and return what it reported.

use strict;
use warnings;

use Exporter 'import';
use File::Basename qw( dirname );
use File::Spec ();
use File::Temp qw( tempdir );
use IPC::Run ();
use IO::Socket::INET ();
use Test::More ();

our @EXPORT = qw( need_nginx run_spec spec_file nginx_running port_free $LibDir );

our $LibDir = File::Spec->rel2abs(
    File::Spec->catdir(dirname(__FILE__), File::Spec->updir, 'lib'));

# skip_all unless TEST_NGINX_BINARY names an executable nginx
sub need_nginx {
    my $bin = $ENV{TEST_NGINX_BINARY};
    if (!$bin || !-x $bin) {
        Test::More::plan(skip_all =>
            'TEST_NGINX_BINARY is not set to an nginx executable; '
            . 'the Test::Nginx::Socket self-tests need one');
    }
    return $bin;
}

# Build a .t file: $head is Perl code run before run_tests() (default
# "no_plan" + no_shuffle), $data the __DATA__ part.
sub spec_file {
    my (%a) = @_;
    my $use  = $a{use}  // "use Test::Nginx::Socket 'no_plan';";
    my $head = $a{head} // '';
    return "$use\nno_shuffle();\n$head\nrun_tests();\n\n__DATA__\n\n$a{data}";
}

# run_spec(port => N, data => '...', [head => '...', use => '...',
#          env => {...}, files => {name => content}, timeout => secs, background => 1])
# Returns a hash ref: exit, out, pass, fail, planned, dir, servroot.
sub run_spec {
    my (%a) = @_;
    my $dir = tempdir('tn-self-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    my $file = "$dir/case.t";
    open my $fh, '>', $file or die "$file: $!";
    print $fh (defined $a{text} ? $a{text} : spec_file(%a));
    close $fh;
    for my $name (keys %{ $a{files} || {} }) {   # extra files next to case.t (its cwd)
        open my $out, '>', "$dir/$name" or die "$dir/$name: $!";
        print $out $a{files}{$name};
        close $out;
    }

    my $servroot = "$dir/servroot";
    local %ENV = %ENV;
    # isolate from the main suite's settings (module .so, ports, log level...)
    delete $ENV{$_} for grep { /^TEST_NGINX_/ && $_ ne 'TEST_NGINX_BINARY' } keys %ENV;
    delete @ENV{qw(HARNESS_ACTIVE HARNESS_VERSION TEST_VERBOSE)};
    $ENV{TEST_NGINX_SERVER_PORT} = $a{port} or die "run_spec: port needed";
    $ENV{TEST_NGINX_SERVROOT}    = $servroot;
    $ENV{TEST_NGINX_BINARY} = File::Spec->rel2abs($ENV{TEST_NGINX_BINARY})
        if $ENV{TEST_NGINX_BINARY} && $ENV{TEST_NGINX_BINARY} =~ m{/};
    $ENV{$_} = $a{env}{$_} for keys %{ $a{env} || {} };

    my @cmd = ($^X, "-I$LibDir", $file);
    my $out = '';
    if ($a{background}) {
        my $h = IPC::Run::start(\@cmd, init => sub { chdir $dir }, \undef, ">&", \$out);
        return { handle => $h, out => \$out, dir => $dir, servroot => $servroot };
    }
    my $t = IPC::Run::timeout($a{timeout} || 120);
    eval { IPC::Run::run(\@cmd, init => sub { chdir $dir }, \undef, ">&", \$out, $t) };
    my $exit = $@ ? -1 : ($? >> 8);
    $out .= "\nRUNNER ERROR: $@" if $@;
    my %r = (
        exit     => $exit,
        out      => $out,
        pass     => scalar(() = $out =~ /^ok \d+/mg),
        fail     => scalar(() = $out =~ /^not ok \d+/mg),
        planned  => ($out =~ /^1\.\.(\d+)/m ? $1 : undef),
        dir      => $dir,
        servroot => $servroot,
    );
    return \%r;
}

sub nginx_running {
    my ($servroot) = @_;
    my $pidfile = "$servroot/logs/nginx.pid";
    open my $in, '<', $pidfile or return 0;
    my $pid = <$in> // '';
    close $in;
    $pid =~ s/\s+//g;
    return 0 unless $pid =~ /^\d+$/ && kill 0, $pid;
    if (open my $st, '<', "/proc/$pid/stat") {
        my $s = <$st> // '';
        return 0 if $s =~ /\)\s+Z\b/;
    }
    return $pid;
}

sub port_free {
    my ($port) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                  Proto => 'tcp', Timeout => 1);
    return 1 unless $s;
    close $s;
    return 0;
}

1;
