# Self-test: every nginx started by Test::Nginx::Socket is stopped, also when
# the test script dies mid-block or is killed with SIGTERM/SIGINT; and the
# generated nginx.conf has the real module's layout.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use Test::More;
use Time::HiRes qw( sleep time );
use RunnerHelper;

need_nginx();
my $PORT = 1992;

# the main suite's t/servroot must not be touched by the self-tests
my $main_conf = "$FindBin::Bin/../servroot/conf/nginx.conf";
my $main_conf_before = -e $main_conf ? (stat _)[9] : 'absent';

# all live (non-zombie) pids whose process group is $pgid, plus $pgid itself
sub group_alive {
    my $pgid = shift;
    return ('no-pid') unless $pgid;
    my @alive;
    opendir my $dh, '/proc' or return ();
    for my $p (grep { /^\d+$/ } readdir $dh) {
        open my $fh, '<', "/proc/$p/stat" or next;
        my $s = <$fh> // '';
        close $fh;
        next unless $s =~ /\)\s+(\S)\s+(\d+)\s+(\d+)/;
        my ($state, $pgrp) = ($1, $3);
        push @alive, $p if $state ne 'Z' && ($p == $pgid || $pgrp == $pgid);
    }
    return @alive;
}

my $die_spec = <<'EOF';
=== TEST 1: dies while nginx runs
--- config
    location = /t { return 200 "x"; }
--- request
GET /t
EOF

for my $master (0, 1) {
    my $label = $master ? 'master_on + workers(2)' : 'single process';
    my $head = ($master ? "master_on();\nworkers(2);\n" : '') . <<'HEAD';
add_response_body_check(sub {
    my $pid = Test::Nginx::Util::get_pid_from_pidfile('');
    print "NGINX_PID=$pid\n";
    my @kids;
    opendir my $d, '/proc';
    for my $p (grep { /^\d+$/ } readdir $d) {
        open my $f, '<', "/proc/$p/stat" or next;
        my $st = <$f> // '';
        push @kids, $p if $st =~ /\)\s+[^Z\s]\s+$pid\s/;
    }
    print "NGINX_CHILDREN=", scalar(@kids), "\n";
    die "boom from the test script\n";
});
HEAD
    my $r = run_spec(port => $PORT, head => $head, data => $die_spec);
    isnt($r->{exit}, 0, "$label: dying script exits non-zero");
    like($r->{out}, qr/boom from the test script/, "$label: the die message is shown");
    my ($pid) = $r->{out} =~ /NGINX_PID=(\d+)/;
    ok($pid, "$label: nginx was running when the script died") or diag $r->{out};
    if ($master) {
        my ($n) = $r->{out} =~ /NGINX_CHILDREN=(\d+)/;
        is($n, 2, "$label: two workers were running");
    }
    is_deeply([ group_alive($pid || 0) ], [], "$label: no nginx process survives the die");
    ok(port_free($PORT), "$label: port $PORT is free again");
}

# SIGTERM / SIGINT while a (slow) request is in flight
my $slow = <<'EOF';
=== TEST 1: slow response
--- config
    location = /t {
        limit_rate 4;
        return 200 "0123456789012345678901234567890123456789012345678901234567890123456789";
    }
--- request
GET /t
--- timeout: 60
EOF

for my $sig (qw(TERM INT)) {
    my $bg = run_spec(port => $PORT, head => "master_on();\n", data => $slow, background => 1);
    my $pid;
    my $deadline = time + 20;
    while (time < $deadline) {
        last if $pid = nginx_running($bg->{servroot});
        sleep 0.05;
    }
    ok($pid, "SIG$sig: nginx started") or diag ${ $bg->{out} };
    sleep 0.5;   # let the request get going
    $bg->{handle}->signal($sig);
    eval { $bg->{handle}->finish };
    my $waited = 0;
    while (group_alive($pid || 0) && $waited < 10) { sleep 0.1; $waited += 0.1 }
    is_deeply([ group_alive($pid || 0) ], [], "SIG$sig: nginx master and workers are gone")
        or diag ${ $bg->{out} };
    ok(port_free($PORT), "SIG$sig: port $PORT is free again");
}

# the generated config follows the real module's template
my $r = run_spec(port => $PORT,
                 env => { TEST_NGINX_LOAD_MODULES => '' },
                 head => "env_to_nginx('FOO_BAR');\n",
                 data => <<'EOF');
=== TEST 1: conf layout
--- main_config
    worker_rlimit_nofile 1024;
--- http_config
    server_tokens on;
--- config
    location = /t { return 200 "x"; }
--- request
GET /t
--- response_body: x
EOF
is($r->{exit}, 0, 'conf layout run passes') or diag $r->{out};
my $conf = do { local $/; open my $f, '<', "$r->{servroot}/conf/nginx.conf" or die $!; <$f> };
my $sr = $r->{servroot};
for my $re (
    qr/\Aworker_processes  1;\ndaemon on;\nmaster_process off;\nerror_log \Q$sr\E\/logs\/error\.log debug;\npid       \Q$sr\E\/logs\/nginx\.pid;\n/,
    qr/^env FOO_BAR;$/m,
    qr/worker_rlimit_nofile 1024;.*^http \{/ms,
    qr/^http \{\n    access_log \Q$sr\E\/logs\/access\.log;\n\n    default_type text\/plain;\n    keepalive_timeout  68;\n.*server_tokens on;.*\n    server \{\n        listen          $PORT;\n        server_name     'localhost';\n\n        client_max_body_size 30M;/ms,
    qr/# Begin test case config...\n    location = \/t \{ return 200 "x"; \}\n\n        # End test case config\./,
    qr/location \/ \{\n            root \Q$sr\E\/html;\n            index index\.html index\.htm;\n        \}/,
    qr/^events \{\n    accept_mutex off;\n\n    worker_connections  64;\n\}/m,
) {
    like($conf, $re, "nginx.conf matches $re");
}
like($r->{servroot}, qr{^/}, 'servroot is an absolute temp path');

# TEST_NGINX_LOAD_MODULES becomes load_module lines appended to main_config
$r = run_spec(port => $PORT,
              env => { TEST_NGINX_LOAD_MODULES => '/no/such/one.so /no/such/two.so' },
              data => "=== TEST 1: lm\n--- main_config\n    worker_rlimit_nofile 1024;\n--- config\n--- must_die\n");
$conf = do { local $/; open my $f, '<', "$r->{servroot}/conf/nginx.conf" or die $!; <$f> };
like($conf, qr/worker_rlimit_nofile 1024;\nload_module \/no\/such\/one\.so; load_module \/no\/such\/two\.so;\n/,
     'load_module lines from TEST_NGINX_LOAD_MODULES');
is($r->{exit}, 0, 'nginx dies on the missing module, as must_die expects') or diag $r->{out};

is(-e $main_conf ? (stat _)[9] : 'absent', $main_conf_before,
   't/servroot/conf/nginx.conf of the main suite is untouched');

done_testing();
