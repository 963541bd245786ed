# Self-test: TEST_NGINX_USE_VALGRIND runs nginx under valgrind, as openresty's Test::Nginx
# does: in the foreground as the runner's own child (daemon off), master_process as
# configured (valgrind follows the workers' fork), one valgrind log per process; must_die
# blocks without valgrind; a number selects the real module's memcheck options (plus
# ./valgrind.suppress); client timeouts are scaled; a start-up failure shows nginx's stderr.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use Test::More;
use File::Temp qw( tempdir );
use RunnerHelper;

need_nginx();
if (system('command -v valgrind >/dev/null 2>&1') != 0) {
    plan(skip_all => 'valgrind is not installed');
}
my $PORT = 1993;

# what the test script (the runner) sees of the nginx serving the request
my $probe = <<'HEAD';
add_response_body_check(sub {
    my $pid = Test::Nginx::Util::get_pid_from_pidfile('');
    my $exe = readlink("/proc/$pid/exe") // '';
    my $cmd = do { local $/; open my $f, '<', "/proc/$pid/cmdline" or die; <$f> };
    $cmd =~ s/\0/ /g;
    my $stat = do { local $/; open my $f, '<', "/proc/$pid/stat" or die; <$f> };
    my ($ppid) = $stat =~ /\)\s+\S+\s+(\d+)/;
    print "PROBE pid=$pid runner=$$ ppid=$ppid exe=$exe\n";
    print "PROBE cmdline=$cmd\n";
});
HEAD

sub probes {
    my ($out) = @_;
    my @p;
    while ($out =~ /^PROBE pid=(\d+) runner=(\d+) ppid=(\d+) exe=(.*)\nPROBE cmdline=(.*)$/mg) {
        push @p, { pid => $1, runner => $2, ppid => $3, exe => $4, cmdline => $5 };
    }
    return @p;
}

sub conf_of {
    my ($r) = @_;
    open my $f, '<', "$r->{servroot}/conf/nginx.conf" or return '';
    local $/;
    return <$f>;
}

sub logs_in {
    my ($dir) = @_;
    return sort glob("$dir/vg.*.log");
}

# 1. options verbatim, one process: a request, a must_die block, a slow response whose gaps
#    exceed the block's timeout (passes only because the timeout is scaled under valgrind)
my $logs = tempdir('tn-vg-XXXXXX', TMPDIR => 1, CLEANUP => 1);
my $r = run_spec(
    port => $PORT,
    head => $probe,
    env  => {
        TEST_NGINX_USE_VALGRIND      => "--tool=memcheck --leak-check=full --log-file='$logs/vg.%p.log'",
        TEST_NGINX_VALGRIND_PID_LOG  => "$logs/pids",
    },
    data => <<'EOF');
=== TEST 1: under valgrind
--- config
    location = /t { return 200 "hello\n"; }
--- request
GET /t
--- response_body
hello

=== TEST 2: must_die runs without valgrind
--- config
    no_such_directive_vg on;
--- must_die
--- error_log
unknown directive "no_such_directive_vg"

=== TEST 3: slow response, client timeout scaled
--- config
    location = /t { limit_rate 100; return 200 "0123456789abcdef0123456789\n"; }
--- request
GET /t
--- timeout: 0.5
--- response_body
0123456789abcdef0123456789
EOF
is($r->{exit}, 0, 'valgrind run: exit 0') or diag $r->{out};
is($r->{fail}, 0, 'valgrind run: no failed test');
is($r->{pass}, 6, 'valgrind run: 6 tests (2 + 2 + 2)');
my @p = probes($r->{out});
is(scalar @p, 2, 'two nginx instances served requests');
for my $i (0 .. $#p) {
    my $p = $p[$i];
    like($p->{exe}, qr{valgrind|memcheck}, "request $i: the nginx process is valgrind's ($p->{exe})");
    like($p->{cmdline}, qr{^\S*valgrind\S* -q --tool=memcheck --leak-check=full --log-file=\S+/vg\.%p\.log \S+ -p \S+/ -c \S+/conf/nginx\.conf},
         "request $i: valgrind -q OPTIONS nginx -p ... -c ...");
    is($p->{ppid}, $p->{runner}, "request $i: nginx is the runner's own child (daemon off)");
}
my @logs = logs_in($logs);
is(scalar @logs, 2, 'one valgrind log per valgrind-run nginx; none for must_die') or diag "@logs";
for my $p (@p) {
    ok(-f "$logs/vg.$p->{pid}.log", "valgrind log of pid $p->{pid} exists");
}
my $pids = do { local $/; open my $f, '<', "$logs/pids" or die $!; <$f> };
like($pids, qr/^$p[0]{pid}\t\S+ TEST 1: under valgrind$/m, 'pid log names TEST 1');
like($pids, qr/^$p[1]{pid}\t\S+ TEST 3: slow response/m, 'pid log names TEST 3');
unlike($pids, qr/TEST 2/, 'pid log: TEST 2 (must_die) did not run under valgrind');
like($r->{out}, qr/^\S+ TEST 1: under valgrind$/m, 'block name printed before the valgrind start, as the real module does');
my $conf = conf_of($r);
like($conf, qr/^daemon off;\nmaster_process off;$/m, 'nginx.conf: daemon off, master_process off');
ok(!nginx_running($r->{servroot}), 'no nginx left running');
ok(port_free($PORT), "port $PORT is free");

# 2. master_on + workers(2): valgrind follows the fork, one log per process
$logs = tempdir('tn-vg-XXXXXX', TMPDIR => 1, CLEANUP => 1);
$r = run_spec(
    port => $PORT,
    head => "master_on();\nworkers(2);\n" . $probe,
    env  => {
        TEST_NGINX_USE_VALGRIND     => "--tool=memcheck --log-file=$logs/vg.%p.log",
        TEST_NGINX_VALGRIND_PID_LOG => "$logs/pids",
    },
    data => <<'EOF');
=== TEST 1: master and two workers under valgrind
--- config
    location = /t { return 200 "w\n"; }
--- request
GET /t
--- response_body
w
EOF
is($r->{exit}, 0, 'master_on: exit 0') or diag $r->{out};
is($r->{fail}, 0, 'master_on: no failed test');
@p = probes($r->{out});
is(scalar @p, 1, 'master_on: probed');
like($p[0]{exe} // '', qr{valgrind|memcheck}, 'master_on: the master is valgrind\'s');
is($p[0]{ppid}, $p[0]{runner}, 'master_on: the master is the runner\'s child');
@logs = logs_in($logs);
is(scalar @logs, 3, 'master_on: three valgrind logs (master + 2 workers)') or diag "@logs";
$pids = do { local $/; open my $f, '<', "$logs/pids" or die $!; <$f> };
is(scalar(() = $pids =~ /^\d+\t/mg), 3, 'pid log names the master and both workers') or diag $pids;
like(conf_of($r), qr/^daemon off;\nmaster_process on;$/m, 'nginx.conf: daemon off, master_process on');
ok(!nginx_running($r->{servroot}), 'master_on: no nginx left running');

# 3. a number: the real module's memcheck options, --suppressions=valgrind.suppress only
#    when that file is in the current directory; valgrind's stderr reaches the test output
for my $with (0, 1) {
    my $label = $with ? 'numeric, ./valgrind.suppress' : 'numeric';
    $r = run_spec(
        port  => $PORT,
        head  => $probe,
        env   => { TEST_NGINX_USE_VALGRIND => 1 },
        files => $with ? { 'valgrind.suppress' => "# nothing\n" } : {},
        data  => <<'EOF');
=== TEST 1: numeric
--- config
    location = /t { return 200 "n\n"; }
--- request
GET /t
--- response_body
n
EOF
    is($r->{exit}, 0, "$label: exit 0") or diag $r->{out};
    @p = probes($r->{out});
    my $sup = $with ? ' --suppressions=valgrind.suppress' : '';
    like($p[0]{cmdline} // '', qr{^\S*valgrind\S* --num-callers=100 -q --tool=memcheck --leak-check=full --show-possibly-lost=no --gen-suppressions=all\Q$sup\E \S+ -p }m,
         "$label: the real module's valgrind command line");
}

# valgrind's own stderr (here: -v after -q brings back its banner) is shown, as with the real module
$r = run_spec(port => $PORT, env => { TEST_NGINX_USE_VALGRIND => '-v --tool=memcheck' }, data => <<'EOF');
=== TEST 1: stderr
--- config
    location = /t { return 200 "s\n"; }
--- request
GET /t
--- response_body
s
EOF
is($r->{exit}, 0, 'stderr run: exit 0') or diag $r->{out};
like($r->{out}, qr/^==\d+== Memcheck, a memory error detector/m, "valgrind's stderr is in the output");

# 4. the runner interrupted (SIGTERM) while a slow request is in flight: nginx under valgrind
#    is stopped (TERM) and reaped, and valgrind gets to finish its log
$logs = tempdir('tn-vg-XXXXXX', TMPDIR => 1, CLEANUP => 1);
my $bg = run_spec(
    port => $PORT,
    background => 1,
    env  => { TEST_NGINX_USE_VALGRIND => "--tool=memcheck --leak-check=full --log-file=$logs/vg.%p.log" },
    data => <<'EOF');
=== TEST 1: slow
--- config
    location = /t { limit_rate 4; return 200 "0123456789012345678901234567890123456789"; }
--- request
GET /t
--- timeout: 60
EOF
my $pid;
my $until = time + 60;
while (time < $until) {
    last if $pid = nginx_running($bg->{servroot});
    select undef, undef, undef, 0.1;
}
ok($pid, 'SIGTERM: nginx started under valgrind') or diag ${ $bg->{out} };
select undef, undef, undef, 1;
$bg->{handle}->signal('TERM');
eval { $bg->{handle}->finish };
ok(!kill(0, $pid || 0), 'SIGTERM: nginx is gone when the runner has exited');
my $vglog = $pid ? do { local $/; open my $f, '<', "$logs/vg.$pid.log" or die $!; <$f> } : undef;
ok(defined $vglog, 'SIGTERM: valgrind log exists');
my $errlog = do { local $/; open my $f, '<', "$bg->{servroot}/logs/error.log" or die $!; <$f> };
like($errlog, qr/signal 15 \(SIGTERM\) received.*\[notice\] \d+#\d+: exit$/ms,
     'SIGTERM: nginx got TERM and exited by itself (not killed)');
ok(port_free($PORT), "SIGTERM: port $PORT is free");

# 4b. the runner interrupted (SIGTERM) while nginx is still starting under valgrind (its pid
#     file not yet written: seconds under valgrind): that nginx is stopped too (it is in its
#     own process group, which the signal to the runner's group does not reach)
$bg = run_spec(
    port => $PORT,
    background => 1,
    env  => { TEST_NGINX_USE_VALGRIND => "--tool=memcheck --leak-check=full --log-file=$logs/start.%p.log" },
    data => <<'EOF');
=== TEST 1: interrupted start
--- config
    location = /t { return 200 "s\n"; }
--- request
GET /t
EOF
# processes whose command line names this run's server root (valgrind, then nginx in it)
my $servroot_procs = sub {
    my @p;
    opendir my $d, '/proc' or return ();
    for my $p (grep { /^\d+$/ } readdir $d) {
        my $cmd = do { local $/; open my $f, '<', "/proc/$p/cmdline" or next; <$f> } // '';
        my $st = do { local $/; open my $f, '<', "/proc/$p/stat" or next; <$f> } // '';
        push @p, $p if index($cmd, $bg->{servroot}) >= 0 && $st !~ /\)\s+Z\b/;
    }
    return @p;
};
my @starting;
$until = time + 60;
while (time < $until) {
    last if @starting = $servroot_procs->();
    select undef, undef, undef, 0.01;
}
ok(@starting && !-e "$bg->{servroot}/logs/nginx.pid", 'start interrupted: valgrind started, no pid file yet')
    or diag ${ $bg->{out} };
$bg->{handle}->signal('TERM');
eval { $bg->{handle}->finish };
my @left = $servroot_procs->();
ok(!@left, 'start interrupted: no nginx left when the runner has exited') or diag "left: @left";
kill 'KILL', @left if @left;
ok(port_free($PORT), "start interrupted: port $PORT is free");

# 5. nginx exiting at start-up under valgrind is a start failure showing its stderr
$r = run_spec(port => $PORT, env => { TEST_NGINX_USE_VALGRIND => '--tool=memcheck' }, data => <<'EOF');
=== TEST 1: bad config without must_die
--- config
    no_such_directive_vg2 on;
--- request
GET /t
EOF
isnt($r->{exit}, 0, 'start failure: non-zero exit');
like($r->{out}, qr/Bail out!.*Cannot start nginx using command "\/bin\/sh -c exec valgrind -q --tool=memcheck .*unknown directive "no_such_directive_vg2"/,
     'start failure: bail out with the command and nginx\'s stderr') or diag $r->{out};
ok(!nginx_running($r->{servroot}), 'start failure: no nginx left running');

done_testing();
