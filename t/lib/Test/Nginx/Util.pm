package Test::Nginx::Util;

# Server management half of the local Test::Nginx::Socket re-implementation
# (see the POD in Test/Nginx/Socket.pm).  Mirrors the variable names and
# behaviour of openresty/test-nginx's Test::Nginx::Util for the supported
# subset: config file generation, starting / stopping nginx, error log
# access, $TEST_NGINX_* expansion and the block loop.

use strict;
use warnings;

our $VERSION = '0.29';

use base 'Exporter';

use POSIX qw( SIGQUIT SIGKILL SIGTERM WNOHANG );
use File::Spec ();
use File::Path qw( make_path remove_tree );
use Cwd ();
use Config ();
use List::Util qw( shuffle );
use Time::HiRes qw( sleep time );
use IO::Socket::INET ();
use Carp qw( croak );
use Scalar::Util ();
use Test::More ();
use Test::LongString ();

# ---------------------------------------------------------------------------
# settings (same names and defaults as the real module)
# ---------------------------------------------------------------------------

our $Verbose              = $ENV{TEST_NGINX_VERBOSE};
our $NoLongString;
our $RepeatEach           = 1;
our $LoadModules          = $ENV{TEST_NGINX_LOAD_MODULES};
our $NoShuffle            = $ENV{TEST_NGINX_NO_SHUFFLE} || 0;
our $Timeout              = $ENV{TEST_NGINX_TIMEOUT} || 3;
our $CheckAccumErrLog     = $ENV{TEST_NGINX_CHECK_ACCUM_ERR_LOG};
our $NoNginxManager       = $ENV{TEST_NGINX_NO_NGINX_MANAGER} || 0;
our $ServerAddr           = '127.0.0.1';
our $ServerName           = 'localhost';
our $WorkerUser           = $ENV{TEST_NGINX_WORKER_USER};
our $NginxBinary          = $ENV{TEST_NGINX_BINARY} || 'nginx';
our $Workers              = 1;
our $WorkerConnections    = 64;
our $LogLevel             = $ENV{TEST_NGINX_LOG_LEVEL} || 'debug';
our $MasterProcessEnabled = $ENV{TEST_NGINX_MASTER_PROCESS} || 'off';
our $DaemonEnabled        = 'on';
our $ServerPort           = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
our $ServerPortForClient  = $ENV{TEST_NGINX_CLIENT_PORT} || $ServerPort || 1984;
our $NoRootLocation       = 0;
our $TestNginxSleep       = $ENV{TEST_NGINX_SLEEP} || 0.015;
our $EventType            = $ENV{TEST_NGINX_EVENT_TYPE};
our $PostponeOutput       = $ENV{TEST_NGINX_POSTPONE_OUTPUT};
our $UseValgrind          = $ENV{TEST_NGINX_USE_VALGRIND};
# valgrind mode (see "Valgrind mode" in Socket.pm's POD). The real module adds
# $ValgrindExtraTimeout (0.3 s) to its QUIC idle timeout only (kept for compatibility, unused
# here); here the client's read timeout is multiplied (memcheck runs nginx 20-50x slower)
our $ValgrindExtraTimeout = 0.3;
our $ValgrindTimeoutFactor = $ENV{TEST_NGINX_VALGRIND_TIMEOUT_FACTOR} || 10;
our $ValgrindStartTimeout = 60;   # seconds for nginx under valgrind to write its pid file
our $ValgrindStopTimeout  = 30;   # seconds to exit after QUIT (incl. the leak check)
our $ValgrindPidLog       = $ENV{TEST_NGINX_VALGRIND_PID_LOG};
our $ConfigPreamble       = '';
our $FilterHttpConfig;
our @EnvToNginx;
our @CleanupHandlers;
our @BlockPreprocessors;
our ($RunTestHelper, $CheckErrorLog, $CheckShutdownErrorLog);
our ($NginxVersion, $NginxRawVersion);
our $ErrLogFilePos = 0;
our $PrevConfig;         # last block's expanded --- config
our $PrevBlock;          # last block whose config was written
our $PrevRandPorts;
our $NginxPid;           # pid of the nginx we started (master or single)
our $MustDieStderr;      # set while a must_die block is being checked
our $NginxChild;         # daemon off (valgrind mode): pid of nginx, our direct child
our $NginxStarting;      # daemon off: that child until it wrote its pid file (a signal then
                         # must stop it too: under valgrind the start takes seconds)
our $NginxChildValgrind; # ... and whether it runs under valgrind
our $StderrPrinted = 0;  # how much of $StderrFile has been shown

# as in the real module: nginx runs in the foreground (as our child) under valgrind;
# master_process stays as configured (valgrind follows fork())
$DaemonEnabled = 'off' if $UseValgrind;

if (defined $WorkerUser && $WorkerUser !~ /^\w+(?:\s+\w+)?$/) {
    die "Bad value in the env TEST_NGINX_WORKER_USER: $WorkerUser\n";
}

our $ServRoot   = $ENV{TEST_NGINX_SERVROOT} || File::Spec->rel2abs('t/servroot');
$ServRoot = File::Spec->rel2abs($ServRoot);
$ENV{TEST_NGINX_SERVER_ROOT} = $ServRoot;

our $LogDir     = File::Spec->catfile($ServRoot, 'logs');
our $ErrLogFile = File::Spec->catfile($LogDir, 'error.log');
our $AccLogFile = File::Spec->catfile($LogDir, 'access.log');
our $HtmlDir    = File::Spec->catfile($ServRoot, 'html');
our $ConfDir    = File::Spec->catfile($ServRoot, 'conf');
our $ConfFile   = File::Spec->catfile($ConfDir, 'nginx.conf');
our $PidFile    = File::Spec->catfile($LogDir, 'nginx.pid');
# Under the logs directory, so that the real Test::Nginx (which removes only conf, html, logs,
# *_cache and *_temp before rmdir-ing the server root) can reuse a server root we used.
our $StderrFile = File::Spec->catfile($LogDir, 'nginx-stderr.log');

our @EXPORT = qw(
    env_to_nginx is_str check_accum_error_log is_running
    $NoLongString no_long_string $ServerAddr server_addr
    $ServerName server_name parse_time verbose sleep_time
    bail_out add_cleanup_handler access_log_data error_log_data
    setup_server_root write_config_file get_canon_version
    get_nginx_version trim show_all_chars parse_headers run_tests
    get_pid_from_pidfile $ServerPortForClient $ServerPort
    $NginxVersion $PidFile $ServRoot $ConfFile $RunTestHelper
    $CheckErrorLog $CheckShutdownErrorLog $FilterHttpConfig
    $NoNginxManager $RepeatEach add_block_preprocessor timeout
    worker_connections workers master_on master_off config_preamble
    repeat_each master_process_enabled log_level no_shuffle
    no_root_location html_dir server_root server_port
    server_port_for_client no_nginx_manager use_hup
);

# ---------------------------------------------------------------------------
# small accessors
# ---------------------------------------------------------------------------

sub no_long_string ()   { $NoLongString = 1 }
sub no_shuffle ()       { $NoShuffle = 1 }
sub no_root_location () { $NoRootLocation = 1 }
sub no_nginx_manager () { $NoNginxManager = 1 }
sub check_accum_error_log () { $CheckAccumErrLog = 1 }
sub use_hup ()          { }   # HUP-reload mode is not implemented: no-op
sub master_on ()        { $MasterProcessEnabled = 'on' }
sub master_off ()       { $MasterProcessEnabled = 'off' }
sub sleep_time ()       { $TestNginxSleep }
sub verbose ()          { $Verbose }
sub html_dir ()         { $HtmlDir }
sub server_root ()      { $ServRoot }
sub config_preamble ($) { $ConfigPreamble = shift }

sub _getset {
    my ($ref, @args) = @_;
    if (@args) { $$ref = $args[0]; return; }
    return $$ref;
}

sub server_addr (@)            { _getset(\$ServerAddr, @_) }
sub server_name (@)            { _getset(\$ServerName, @_) }
sub server_port (@)            { _getset(\$ServerPort, @_) }
sub server_port_for_client (@) { _getset(\$ServerPortForClient, @_) }
sub timeout (@)                { _getset(\$Timeout, @_) }
sub worker_connections (@)     { _getset(\$WorkerConnections, @_) }
sub workers (@)                { _getset(\$Workers, @_) }
sub log_level (@)              { _getset(\$LogLevel, @_) }

sub repeat_each (@) {
    $RepeatEach = shift if @_;
    return $RepeatEach;
}

sub master_process_enabled (@) {
    if (@_) {
        $MasterProcessEnabled = shift() ? 'on' : 'off';
        return;
    }
    return $MasterProcessEnabled;
}

sub env_to_nginx (@) {
    croak "env_to_nginx: no arguments specified" unless @_;
    for my $v (@_) {
        croak "env_to_nginx: bad argument value: $v\n"
            if $v !~ /^[A-Za-z_]/ || $v =~ /\n/;
        push @EnvToNginx, $v;
    }
}

sub add_block_preprocessor (&) { unshift @BlockPreprocessors, shift }
sub add_cleanup_handler ($)    { unshift @CleanupHandlers, shift }

sub is_running ($) {
    my $pid = shift;
    return 0 unless $pid;
    return 0 unless kill 0, $pid;
    # a daemonized nginx is re-parented to PID 1, which may be slow to reap
    # it: a zombie counts as gone
    if (open my $fh, '<', "/proc/$pid/stat") {
        my $stat = <$fh> // '';
        close $fh;
        return 0 if $stat =~ /\)\s+Z\b/;
    }
    return 1;
}

sub is_str (@) {
    my ($got, $expected, $desc) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    if (ref $expected && ref $expected eq 'Regexp') {
        return Test::More::like($got, $expected, $desc);
    }
    if ($NoLongString) {
        return Test::More::is($got, $expected, $desc);
    }
    return Test::LongString::is_string($got, $expected, $desc);
}

sub parse_time ($) {
    my $tm = shift;
    if (defined $tm) {
        if ($tm =~ s/([^_a-zA-Z])ms$/$1/) {
            $tm = $tm / 1000;
        } else {
            $tm =~ s/([^_a-zA-Z])s$/$1/;
        }
    }
    return $tm;
}

sub trim ($) {
    my $s = shift;
    return undef if !defined $s;
    $s =~ s/^\s+|\s+$//g;
    $s =~ s/\n/ /gs;
    $s =~ s/\s{2,}/ /gs;
    return $s;
}

sub show_all_chars ($) {
    my $s = shift;
    $s =~ s/\n/\\n/gs;
    $s =~ s/\r/\\r/gs;
    $s =~ s/\t/\\t/gs;
    return $s;
}

# "Name: value" lines -> ordered list of [name, value]; "!Name" -> value undef.
# (The real module returns a hash; we keep order so test names are stable.
# Duplicate names collapse to the last value, as with a hash.)
sub parse_headers ($) {
    my $s = shift;
    my (%seen, @order);
    for my $line (split /\n/, $s) {
        $line =~ s/^\s+|\s+$//g;
        my $neg = ($line =~ s/^!\s*//);
        my ($key, $val);
        if ($neg) {
            $key = $line;
        } else {
            ($key, $val) = split /\s*:\s*/, $line, 2;
            $key = '' unless defined $key;
        }
        push @order, $key unless exists $seen{$key};
        $seen{$key} = $val;
    }
    return [ map { [ $_, $seen{$_} ] } @order ];
}

# A client-side timeout, multiplied by $ValgrindTimeoutFactor under valgrind.
sub valgrind_scaled ($) {
    my $t = shift;
    return $t unless $UseValgrind && defined $t;
    return $t * $ValgrindTimeoutFactor;
}

sub get_canon_version (@) {
    sprintf "%d.%03d%03d", $_[0], $_[1], $_[2];
}

# ---------------------------------------------------------------------------
# failure helpers
# ---------------------------------------------------------------------------

sub bail_out (@) {
    cleanup();
    Test::More::BAIL_OUT(join '', @_);
}

# ---------------------------------------------------------------------------
# nginx binary
# ---------------------------------------------------------------------------

sub can_run {
    my ($cmd) = @_;
    if ($cmd =~ m{[/\\]}) {
        return (-f $cmd && -x $cmd) ? $cmd : undef;
    }
    for my $dir ((split /\Q$Config::Config{path_sep}\E/, $ENV{PATH} // ''), '.') {
        next if $dir eq '';
        my $abs = File::Spec->catfile($dir, $cmd);
        return $abs if -f $abs && -x $abs;
    }
    return undef;
}

sub get_nginx_version () {
    if (!can_run($NginxBinary)) {
        bail_out("Cannot find the nginx executable \"$NginxBinary\" "
                 . "(set TEST_NGINX_BINARY or PATH)");
    }
    my $out = `'$NginxBinary' -V 2>&1`;
    if (!defined $out || $? != 0) {
        $out //= '';
        bail_out("Failed to get the version of the Nginx in PATH: $out");
    }
    if ($out =~ m{(?:nginx|openresty)[^/]*/(\d+)\.(\d+)\.(\d+)}s
        || $out =~ m{\w+/(\d+)\.(\d+)\.(\d+)}s)
    {
        $NginxRawVersion = "$1.$2.$3";
        return get_canon_version($1, $2, $3);
    }
    bail_out("Failed to parse the output of \"nginx -V\": $out\n");
}

# ---------------------------------------------------------------------------
# server root, config file
# ---------------------------------------------------------------------------

sub setup_server_root (;$) {
    if (-d $ServRoot) {
        remove_tree($ConfDir, $HtmlDir, $LogDir,
                    glob("$ServRoot/*_cache"), glob("$ServRoot/*_temp"));
        unlink $StderrFile;
    }
    for my $d ($ServRoot, $LogDir, $HtmlDir, $ConfDir) {
        next if -d $d;
        make_path($d) or bail_out("Failed to do mkdir $d: $!\n");
    }
    my $index = "$HtmlDir/index.html";
    open my $out, '>', $index
        or bail_out("Can't open $index for writing: $!\n");
    print $out '<html><head><title>It works!</title></head>'
             . '<body>It works!</body></html>';
    close $out;
}

sub gen_rand_port ($) {
    my $used = shift;
    for (1 .. 1000) {
        my $port = int(rand 63550) + 1985;
        next if $used->{$port};
        my $sock = IO::Socket::INET->new(
            LocalAddr => $ServerAddr, LocalPort => $port,
            Proto => 'tcp', Timeout => 0.1,
        );
        if ($sock) { close $sock; return $port; }
    }
    return undef;
}

sub expand_env_in_text ($$$) {
    my ($text, $name, $rand_ports) = @_;
    return undef unless defined $text;
    my %used = ($ServerPort => 1, map { $_ => 1 } values %$rand_ports);
    $text =~ s{\$(TEST_NGINX_[_A-Z0-9]+)}{
        my $var = $1;
        my $v;
        if ($var =~ /^TEST_NGINX_RAND_PORT_[0-9]+$/) {
            if (!defined $rand_ports->{$var}) {
                my $p = gen_rand_port(\%used);
                bail_out("$name - Cannot find an available listening port "
                         . "number for $var.\n") unless defined $p;
                $rand_ports->{$var} = $p;
                $used{$p} = 1;
            }
            $v = $rand_ports->{$var};
        } else {
            bail_out("$name - No environment $var defined.\n")
                unless defined $ENV{$var};
            $v = $ENV{$var};
        }
        $v;
    }eg;
    return $text;
}

sub write_user_files ($$) {
    my ($block, $rand_ports) = @_;
    my $name = $block->name;
    my $files = $block->user_files;
    return unless $files;

    if (!ref $files) {
        my @list;
        my ($fname, $body, $date);
        for my $line (split /^/, $files) {
            if ($line =~ /^>>> (\S+)(?:\s+(.+))?/) {
                push @list, [$fname, $body, $date] if defined $fname;
                ($fname, $date, $body) = ($1, $2, undef);
            } else {
                $body .= $line;
            }
        }
        push @list, [$fname, $body, $date] if defined $fname;
        $files = \@list;
    } elsif (ref $files ne 'ARRAY') {
        bail_out("$name - wrong value type: ", ref $files,
                 ", only scalar or ARRAY are accepted");
    }

    for my $file (@$files) {
        my ($fname, $body, $date) = @$file;
        $body = '' unless defined $body;
        my $path = $fname =~ m{^/} ? $fname : "$HtmlDir/$fname";
        if ($path =~ m{(.*)/}) {
            my $dir = $1;
            make_path($dir) unless -d $dir;
        }
        $body = expand_env_in_text($body, $name, $rand_ports);
        open my $out, '>', $path
            or bail_out("$name - Cannot open $path for writing: $!\n");
        binmode $out;
        print $out $body;
        close $out;
        if ($date) {
            system("TZ=GMT touch -t '$date' '$path'") == 0
                or bail_out("$name - failed to set the mtime of $path\n");
        }
    }
}

sub write_config_file ($$$) {
    my ($block, $config, $rand_ports) = @_;
    my $name = $block->name;

    my $http_config      = expand_env_in_text($block->http_config, $name, $rand_ports) // '';
    my $main_config      = $block->main_config // '';
    my $post_main_config = expand_env_in_text($block->post_main_config, $name, $rand_ports) // '';
    my $err_log_file     = $block->error_log_file || $ErrLogFile;
    my $server_name      = $block->server_name // $ServerName;
    $config //= '';

    $http_config = $FilterHttpConfig->($http_config) if $FilterHttpConfig;

    my $extra_http_config = '';
    if (defined $PostponeOutput && $http_config !~ /\bpostpone_output\b/) {
        bail_out("Bad TEST_NGINX_POSTPONE_OUTPUT value: $PostponeOutput\n")
            if $PostponeOutput !~ /^\d+$/;
        $extra_http_config = "\n    postpone_output $PostponeOutput;\n";
    }

    # like the real one: load_module lines are appended to main_config
    if ($LoadModules) {
        my @mods = map { "load_module $_;" } grep { length } split /\s+/, $LoadModules;
        $main_config .= join ' ', @mods if @mods;
    }
    $main_config = expand_env_in_text($main_config, $name, $rand_ports);

    my $env = '';
    for my $v (qw(MOCKEAGAIN_VERBOSE MOCKEAGAIN MOCKEAGAIN_WRITE_TIMEOUT_PATTERN
                  LD_PRELOAD LD_LIBRARY_PATH DYLD_INSERT_LIBRARIES
                  DYLD_FORCE_FLAT_NAMESPACE))
    {
        $env .= "env $v;\n";
    }
    for my $v (@EnvToNginx) {
        my $q = $v =~ /\s/ ? "'$v'" : $v;
        $env .= "env $q;\n";
    }

    my $root_location = $NoRootLocation ? '' : <<"_EOC_";
        location / {
            root $HtmlDir;
            index index.html index.htm;
        }
_EOC_

    my $events_use = $EventType ? "    use $EventType;\n" : '';
    my $user = defined $WorkerUser ? "user $WorkerUser;\n"
             : $> == 0             ? "user root;\n"
             :                       '';

    open my $out, '>', $ConfFile
        or bail_out("Can't open $ConfFile for writing: $!\n");
    print $out <<"_EOC_";
worker_processes  $Workers;
daemon $DaemonEnabled;
master_process $MasterProcessEnabled;
error_log $err_log_file $LogLevel;
pid       $PidFile;
$env
$main_config

http {
    access_log $AccLogFile;

    default_type text/plain;
    keepalive_timeout  68;
$extra_http_config
$http_config

    server {
        listen          $ServerPort;
        server_name     '$server_name';

        client_max_body_size 30M;

        # Begin preamble config...
$ConfigPreamble
        # End preamble config...

        # Begin test case config...
$config
        # End test case config.

$root_location    }
}

$post_main_config

events {
    accept_mutex off;

    worker_connections  $WorkerConnections;
$events_use}
env ASAN_OPTIONS;
$user
_EOC_
    close $out;
}

# ---------------------------------------------------------------------------
# process management
# ---------------------------------------------------------------------------

sub get_pid_from_pidfile ($) {
    my ($name) = @_;
    open my $in, '<', $PidFile or return undef;
    my $pid = do { local $/; <$in> };
    close $in;
    return undef unless defined $pid;
    $pid =~ s/\s+//g;
    return $pid =~ /^\d+$/ ? $pid : undef;
}

# pids (other than $pid) whose process group or parent is $pid
sub _related_pids ($) {
    my $pid = shift;
    my @out;
    opendir my $dh, '/proc' or return ();
    for my $p (grep { /^\d+$/ } readdir $dh) {
        next if $p == $pid;
        open my $fh, '<', "/proc/$p/stat" or next;
        my $stat = <$fh> // '';
        close $fh;
        $stat =~ s/^.*\)\s+//s or next;
        my (undef, $ppid, $pgrp) = split /\s+/, $stat;
        push @out, $p if $ppid == $pid || $pgrp == $pid;
    }
    closedir $dh;
    return @out;
}

# $resend: a signal to send again every second while nginx's pid file exists
sub _wait_gone ($$;$) {
    my ($pid, $secs, $resend) = @_;
    my $deadline = time + $secs;
    my $next = time + 1;
    while (is_running($pid)) {
        waitpid($pid, WNOHANG);
        return 0 if time > $deadline;
        if ($resend && time > $next) {
            kill $resend, $pid if -f $PidFile;
            $next = time + 1;
        }
        sleep 0.02;
    }
    return 1;
}

# true if $pid is the nginx we started under valgrind
sub _under_valgrind ($) {
    my $pid = shift;
    return $NginxChildValgrind && $NginxChild && $pid == $NginxChild;
}

# Valgrind mode: note which test block a (valgrind-run) nginx pid belongs to, so that a
# valgrind log named after the pid (--log-file=...%p...) can be traced back to its block.
sub _log_valgrind_pids ($@) {
    my ($name, @pids) = @_;
    return unless $ValgrindPidLog && @pids;
    open my $out, '>>', $ValgrindPidLog or return;
    print $out "$_\t$name\n" for @pids;
    close $out;
}

# $wait true: graceful (QUIT, up to timeout() seconds, or $ValgrindStopTimeout under
# valgrind, which writes its leak report at exit); false: TERM at once
sub kill_process ($$$) {
    my ($pid, $wait, $name) = @_;
    return unless $pid;
    my @kids = _related_pids($pid);
    my $vg = _under_valgrind($pid);
    _log_valgrind_pids($name, grep { is_running($_) } @kids) if $vg;

    if (is_running($pid)) {
        my $sig = $wait ? SIGQUIT : SIGTERM;
        kill $sig, $pid;
        my $secs = $vg ? $ValgrindStopTimeout : $wait ? timeout() : 1;
        # Under valgrind a signal that arrives while nginx runs code is delivered just before
        # its next epoll_wait(), which then blocks anyway (no timer, no event): nginx misses
        # it. Send it again while the pid file exists (nginx removes it just before exit(),
        # then valgrind runs its leak check); the real module also re-sends QUIT.
        if (!_wait_gone($pid, $secs, $vg ? $sig : undef)) {
            warn "$name - timeout when waiting for the process $pid to exit\n";
            kill SIGTERM, $pid;
            if (!_wait_gone($pid, $vg ? 5 : 1)) {
                warn "$name - WARNING: killing the process $pid with force...\n";
                kill SIGKILL, -$pid;   # process group (nginx calls setsid; our child: setpgrp)
                kill SIGKILL, $pid;
                _wait_gone($pid, 2);
            }
        }
    }

    # make sure no worker survives its master
    my @left = grep { is_running($_) } @kids, _related_pids($pid);
    if (@left) {
        sleep 0.1;
        @left = grep { is_running($_) } @left;
        kill SIGKILL, @left if @left;
    }
}

# nginx's stderr (valgrind's too, unless it logs to a file) goes to $StderrFile; show what
# it wrote since last time (daemon off: the file grows while nginx runs)
sub _print_new_stderr () {
    open my $in, '<', $StderrFile or return;
    seek $in, $StderrPrinted, 0 if $StderrPrinted;
    local $/;
    my $s = <$in> // '';
    $StderrPrinted = tell $in;
    close $in;
    print STDERR $s if length $s;
}

sub stop_nginx ($;$) {
    my ($name, $fast) = @_;
    my $pid = $NginxPid || $NginxChild;
    $pid = get_pid_from_pidfile($name) if !$pid && -f $PidFile;
    if ($pid) {
        kill_process($pid, !$fast, $name);
    }
    if ($NginxChild) {
        # nginx in the foreground (daemon off) is our child: reap it
        kill_process($NginxChild, 0, $name) if $NginxChild != $pid && is_running($NginxChild);
        waitpid($NginxChild, WNOHANG);
        _print_new_stderr();
        undef $NginxChild;
        undef $NginxChildValgrind;
    }
    undef $NginxPid;
    unlink $PidFile if -f $PidFile && !is_running($pid);
}

sub cleanup (;$) {
    my $fast = shift;
    if ($NginxStarting) {
        # its own process group (setpgrp in run_nginx_cmd)
        kill SIGKILL, -$NginxStarting;
        kill SIGKILL, $NginxStarting;
        waitpid($NginxStarting, 0);
        undef $NginxStarting;
    }
    for my $hdl (@CleanupHandlers) {
        eval { $hdl->() };
    }
    stop_nginx('cleanup', $fast);
}

my $SignalsInstalled;
sub install_signal_handlers () {
    return if $SignalsInstalled++;
    # PIPE too: when prove is killed, the next line a test prints would end it silently,
    # leaving nginx running (under valgrind it is in its own process group).
    for my $sig (qw(INT TERM HUP PIPE)) {
        my $old = $SIG{$sig};
        next if defined $old && ref $old;   # respect user handlers
        $SIG{$sig} = sub {
            $SIG{PIPE} = 'IGNORE';
            cleanup(1);
            $SIG{$sig} = 'DEFAULT';
            kill $sig, $$;
            exit 1;
        };
    }
}

# The command line that starts nginx: the real module's, with the valgrind prefix when
# TEST_NGINX_USE_VALGRIND is set (a number: the real module's default memcheck options,
# plus --suppressions=valgrind.suppress if that file exists in the current directory;
# anything else: valgrind's options, verbatim, word-split by the shell as the real module's
# "valgrind -q $opts $cmd" is).
sub nginx_command () {
    my @cmd = ($NginxBinary, '-p', "$ServRoot/", '-c', $ConfFile);
    return @cmd unless $UseValgrind;
    if ($UseValgrind =~ /^\d+$/) {
        return ('valgrind', '--num-callers=100', '-q', '--tool=memcheck', '--leak-check=full',
                '--show-possibly-lost=no', '--gen-suppressions=all',
                (-f 'valgrind.suppress' ? ('--suppressions=valgrind.suppress') : ()), @cmd);
    }
    return ('/bin/sh', '-c', "exec valgrind -q $UseValgrind \"\$@\"", 'sh', @cmd);
}

# Runs nginx. Returns its exit status ($?), -1 if it could not be executed.
# daemon on: returns when the command returns (nginx has daemonized, its port listens).
# daemon off (valgrind mode): nginx stays in the foreground as our child, in its own process
# group; returns its status if it exits (a start-up failure, or a must_die block), else 0 as
# soon as it has written its pid file (its port listens then), with $NginxChild set.
our $StartTimedOut;
sub run_nginx_cmd () {
    my @cmd = nginx_command();
    my $daemon = $DaemonEnabled ne 'off';
    warn "running: @cmd\n" if $Verbose;
    undef $StartTimedOut;
    $StderrPrinted = 0;
    my $pid = fork;
    return -1 unless defined $pid;
    if ($pid == 0) {
        setpgrp(0, 0) unless $daemon;
        open STDIN, '<', '/dev/null';
        open STDOUT, '>', '/dev/null';
        open STDERR, '>', $StderrFile;
        { no warnings 'exec'; exec { $cmd[0] } @cmd; }
        POSIX::_exit(127);
    }
    if ($daemon) {
        waitpid($pid, 0);
        return $?;
    }
    $NginxStarting = $pid;
    my $status = _wait_started($pid);
    undef $NginxStarting;
    return $status;
}

sub _wait_started ($) {
    my ($pid) = @_;

    my $deadline = time + ($UseValgrind ? $ValgrindStartTimeout : 10);
    while (1) {
        if (waitpid($pid, WNOHANG) == $pid) {
            return $?;
        }
        my $p = get_pid_from_pidfile('');
        if (defined $p && $p == $pid) {
            $NginxChild = $pid;
            $NginxChildValgrind = $UseValgrind ? 1 : 0;
            return 0;
        }
        if (time > $deadline) {
            $StartTimedOut = 1;
            kill SIGKILL, -$pid;
            kill SIGKILL, $pid;
            waitpid($pid, 0);
            return $?;
        }
        sleep 0.02;
    }
}

sub read_stderr_file () {
    open my $in, '<', $StderrFile or return '';
    local $/;
    my $s = <$in> // '';
    close $in;
    return $s;
}

sub wait_for_nginx ($) {
    my $name = shift;
    my $deadline = time + timeout();
    my $pid;
    while (time < $deadline) {
        $pid = get_pid_from_pidfile($name);
        last if $pid && is_running($pid);
        sleep 0.01;
    }
    return undef unless $pid;
    if ($MasterProcessEnabled eq 'on') {
        # wait (briefly) for the worker processes to be forked
        my $until = time + (_under_valgrind($pid) ? $ValgrindStartTimeout : 1);
        while (time < $until) {
            my @w = grep { is_running($_) } _related_pids($pid);
            last if @w >= $Workers;
            sleep 0.01;
        }
    }
    return $pid;
}

# ---------------------------------------------------------------------------
# logs
# ---------------------------------------------------------------------------

sub _read_log_from ($$) {
    my ($file, $pos_ref) = @_;
    open my $in, '<', $file or return undef;
    seek $in, $$pos_ref, 0 if $pos_ref && $$pos_ref > 0;
    my @lines = <$in>;
    $$pos_ref = tell($in) if $pos_ref;
    close $in;
    return \@lines;
}

sub error_log_data () {
    # give the log phase (which runs after the connection is closed) a moment
    sleep $TestNginxSleep * 3;
    my $pos = $ErrLogFilePos;
    my $lines = _read_log_from($ErrLogFile, \$pos);
    $ErrLogFilePos = $pos unless $CheckAccumErrLog;
    if ($CheckAccumErrLog) {
        $lines = _read_log_from($ErrLogFile, undef);
    }
    if ($MustDieStderr && (!$lines || !@$lines)) {
        # Deviation from the real Test::Nginx, which reads error.log only: an nginx built with
        # --error-log-path=stderr (Debian's packages) reports configuration errors on stderr
        # only, so must_die blocks fall back to nginx's stderr when error.log is empty.
        $lines = [ map { "$_\n" } split /\n/, read_stderr_file() ];
    }
    return $lines // [];
}

sub access_log_data () {
    sleep $TestNginxSleep * 3;
    return _read_log_from($AccLogFile, undef) // [];
}

# ---------------------------------------------------------------------------
# the block loop
# ---------------------------------------------------------------------------

sub run_tests () {
    $NginxVersion = get_nginx_version();
    $ENV{TEST_NGINX_SERVER_PORT} = $ServerPort
        unless defined $ENV{TEST_NGINX_SERVER_PORT};
    install_signal_handlers();

    my @blocks = Test::Base::blocks();
    @blocks = shuffle @blocks unless $NoShuffle;
    for my $block (@blocks) {
        $_->($block) for @BlockPreprocessors;
        $block->set_value('name', $0 . ' ' . $block->name);
        run_test($block);
    }
    cleanup();
}

sub _skip_info ($) {
    my $block = shift;
    my $name = $block->name;
    my ($tests_to_skip, $should_skip, $skip_reason);

    if (defined(my $skip_eval = $block->skip_eval)) {
        if ($skip_eval =~ /^\s*(\d+)\s*:\s*(.*)/s) {
            $tests_to_skip = $1;
            $skip_reason = 'skip_eval';
            my $code = $2;
            $should_skip = eval $code;
            bail_out("$name - skip_eval - failed to eval the Perl code "
                     . "\"$code\": $@") if $@;
        }
    }

    if (defined(my $skip_nginx = $block->skip_nginx)) {
        if ($skip_nginx =~ /^\s*(\d+)\s*:\s*([<>]=?)\s*(\d+)\.(\d+)\.(\d+)
                            (?:\s*:\s*(.*))?\s*$/x)
        {
            $tests_to_skip = $1;
            my ($op, $ver) = ($2, get_canon_version($3, $4, $5));
            $skip_reason = $6 || "nginx version $op $3.$4.$5";
            $should_skip = 1 if eval "$NginxVersion $op $ver";
        } else {
            bail_out("$name - Invalid --- skip_nginx spec: $skip_nginx");
        }
    }

    my ($should_todo, $todo_reason);
    if (defined(my $todo = $block->todo)) {
        if ($todo =~ /^\s*(\d+)\s*:\s*(.*)/s) {
            ($should_todo, $tests_to_skip, $todo_reason) = (1, $1, $2);
        } else {
            bail_out("$name - Invalid --- todo spec: $todo");
        }
    }

    return ($should_skip, $tests_to_skip, $skip_reason || 'various reasons',
            $should_todo, $todo_reason || 'various reasons');
}

sub run_test ($) {
    my $block = shift;
    return if defined $block->SKIP;

    my $name = $block->name;
    my $rand_ports = {};
    my $config = expand_env_in_text($block->config, $name, $rand_ports);
    my $dry_run = 0;

    local $LogLevel = $block->log_level || $LogLevel;

    my $must_die = $block->must_die;
    # as in the real module, must_die blocks run without valgrind
    local $UseValgrind = defined $must_die ? undef : $UseValgrind;
    my ($should_skip, $tests_to_skip, $skip_reason, $should_todo, $todo_reason)
        = _skip_info($block);

    # which block's config to start nginx with
    my ($conf_block, $conf_text, $conf_ports) = ($block, $config, $rand_ports);
    if (!defined $config && !$NoNginxManager) {
        if (!defined $PrevConfig) {
            bail_out("$name - No '--- config' section specified and could not "
                     . "get previous one. Use TEST_NGINX_NO_NGINX_MANAGER ?");
        }
        # the real module keeps the previous nginx running here; we restart
        # it with the previous block's configuration
        ($conf_block, $conf_text, $conf_ports) = ($PrevBlock, $PrevConfig, $PrevRandPorts);
    }

    if (!$NoNginxManager && !$should_skip) {
        # stop whatever a previous (possibly aborted) run left behind
        stop_nginx($name);

        setup_server_root();
        write_user_files($block, $rand_ports);
        write_config_file($conf_block, $conf_text, $conf_ports);
        ($PrevBlock, $PrevConfig, $PrevRandPorts) = ($conf_block, $conf_text, $conf_ports);

        if (!can_run($NginxBinary)) {
            bail_out("$name - Cannot find the nginx executable in the PATH environment");
        }

        $ErrLogFilePos = 0;
        my $waited = 0;
        my $tries = 0;
        warn "$name\n" if $UseValgrind;   # as the real module does
        while (1) {
            my $status = run_nginx_cmd();
            my $exit_code = $status == -1 ? undef : ($status >> 8);
            my $coredump  = $status != -1 && ($status & 128);

            if (defined $must_die) {
                for my $i (0 .. $RepeatEach - 1) {
                    if ($i > 0) {
                        $status = run_nginx_cmd();
                        $exit_code = $status == -1 ? undef : ($status >> 8);
                        $coredump = $status != -1 && ($status & 128);
                    }
                    if ($status == -1) {
                        Test::More::fail("$name - failed to execute the nginx command line");
                    } elsif ($coredump) {
                        Test::More::fail("$name - nginx core dumped");
                    } elsif (Scalar::Util::looks_like_number($must_die)) {
                        Test::More::is($must_die, $exit_code,
                                       "$name - die with the expected exit code");
                    } else {
                        Test::More::isnt($status, 0, "$name - die as expected");
                    }

                    {
                        local $MustDieStderr = 1;
                        $CheckErrorLog->($block, undef, $dry_run, $i, 0);
                    }

                    if ($status == 0) {
                        warn "WARNING: $name - nginx must die but it does not; "
                             . "killing it (req $i)\n";
                        $NginxPid = wait_for_nginx($name);
                        stop_nginx($name);
                    }
                }
                return;
            }

            if ($status == 0) {
                _print_new_stderr();
                last;
            }

            # retry only when the port is still taken (e.g. by a dying
            # nginx); any other start-up error is final
            my $err = read_stderr_file();
            $tries++;
            my $delay = 0.1 * $tries;
            $delay = 1 if $delay > 1;
            $waited += $delay;
            if ($waited >= 10 || $err !~ /Address already in use/ || $StartTimedOut) {
                (my $one_line = $err) =~ s/\s*\n\s*/ | /g;
                $one_line =~ s/ \| $//;
                my $why = $StartTimedOut
                    ? "no pid file after $ValgrindStartTimeout s, killed" : "status code $status";
                bail_out("$name - Cannot start nginx using command "
                         . "\"@{[ nginx_command() ]}\" ($why): $one_line");
            }
            sleep $delay;
        }

        $NginxPid = wait_for_nginx($name);
        if (!$NginxPid) {
            my $err = read_stderr_file();
            bail_out("$name - nginx did not write its pid file $PidFile\n$err");
        }
        _log_valgrind_pids($name, $NginxPid) if _under_valgrind($NginxPid);
        sleep $TestNginxSleep;
    }

    if ($block->init) {
        eval $block->init;
        bail_out("$name - init failed: $@") if $@;
    }

    $ErrLogFilePos = 0;
    for my $i (1 .. $RepeatEach) {
        write_user_files($block, $rand_ports) if $i > 1;

        if ($should_skip && defined $tests_to_skip) {
            SKIP: {
                Test::More::skip("$name - $skip_reason", $tests_to_skip);
            }
        } elsif ($should_todo) {
            TODO: {
                Test::More::todo_skip("$name - $todo_reason", $tests_to_skip);
            }
        } else {
            $RunTestHelper->($block, $dry_run, $i - 1);
        }
    }

    if (!$NoNginxManager && !$should_skip) {
        stop_nginx($name);
        if (defined $block->shutdown_error_log || defined $block->no_shutdown_error_log) {
            $CheckShutdownErrorLog->($block, $dry_run);
        }
    }
}

our $MainPid = $$;

END {
    # not in children forked by the test script (they would kill our nginx)
    if (defined $MainPid && $$ == $MainPid) {
        local $?;   # don't let our waitpid()s change the exit status
        cleanup();
    }
}

1;
