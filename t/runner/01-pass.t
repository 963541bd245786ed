# Self-test: correct expectations make Test::Nginx::Socket blocks PASS,
# and the number of tests emitted matches the real module's counting.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use Test::More;
use RunnerHelper;

need_nginx();
my $PORT = 1990;

sub passes {
    my ($name, $r, $expect_tests) = @_;
    my $ok = ok($r->{exit} == 0 && $r->{fail} == 0 && $r->{pass} > 0, "$name: passes");
    is($r->{pass}, $expect_tests, "$name: emitted $expect_tests tests")
        if defined $expect_tests;
    diag($r->{out}) unless $ok;
    ok(!nginx_running($r->{servroot}), "$name: no nginx left running");
}

# 1. the common sections, one block each
my $r = run_spec(port => $PORT, env => { TEST_NGINX_GREETING => 'howdy' }, data => <<'EOF');
=== TEST 1: body, status, headers
--- config
    location = /t {
        add_header X-Foo bar;
        return 200 "hello\n";
    }
--- request
GET /t
--- response_headers
X-Foo: bar
Content-Type: text/plain
!X-Absent
--- response_body
hello
--- error_code: 200
--- no_error_log
[error]
[warn]

=== TEST 2: default error_code is 200, response_body_like, headers_like
--- config
    location = /t { return 200 "abc 123 xyz"; }
--- request
GET /t
--- response_headers_like
Content-Length: \d+
Server: nginx.*
--- response_body_like: \d{3}

=== TEST 3: 404 and error_log (plain substring)
--- config
    location /m { root html; }
--- request
GET /m/missing.txt
--- error_code: 404
--- error_log
No such file or directory
open()

=== TEST 4: error_log with qr// via eval
--- config
    location /m { root html; }
--- request
GET /m/x
--- error_code: 404
--- error_log eval
qr/open\(\) "[^"]+missing|open\(\) "[^"]+\/m\/x" failed \(2:/

=== TEST 5: eval request list, one connection each
--- config
    location = /a { return 200 "A\n"; }
    location = /b { return 201 "B\n"; }
    location = /c { return 404; }
--- request eval
["GET /a", "GET /b", "GET /c"]
--- error_code eval
[200, 201, 404]
--- response_body_like eval
["^A\$", "^B\$", "404 Not Found"]

=== TEST 6: $TEST_NGINX_ substitution in config
--- config
    location = /t { return 200 "$TEST_NGINX_GREETING on $TEST_NGINX_SERVER_PORT\n"; }
--- request
GET /t
--- response_body eval
"howdy on $ENV{TEST_NGINX_SERVER_PORT}\n"

=== TEST 7: must_die + error_log
--- config
    no_such_directive_here on;
--- must_die
--- error_log
unknown directive "no_such_directive_here"

=== TEST 8: more_headers, POST body, main_config, http_config
--- main_config
    env TEST_NGINX_GREETING;
--- http_config
    map $http_x_in $out_hdr { default "got-$http_x_in"; }
--- config
    location = /p {
        add_header X-Out $out_hdr;
        return 200 "len=$content_length ct=$http_content_type\n";
    }
--- more_headers
X-In: ping
Content-Type: text/x-test
--- request
POST /p
hello body
--- response_headers
X-Out: got-ping
--- response_body
len=10 ct=text/x-test

=== TEST 9: chunked response is decoded
--- config
    location = /t {
        ssi on;
        ssi_types *;
        return 200 "hello <!--# echo var=\"arg_w\" -->\n";
    }
--- request
GET /t?w=there
--- response_headers
Transfer-Encoding: chunked
--- response_body
hello there

=== TEST 10: raw_request, HEAD-less HTTP/1.0
--- config
    location = /r { return 200 "raw $server_protocol\n"; }
--- raw_request eval
"GET /r HTTP/1.0\r\nHost: localhost\r\n\r\n"
--- response_body
raw HTTP/1.0

=== TEST 11: user_files and the default root location
--- user_files
>>> sub/data.txt
file contents
--- config
--- request
GET /sub/data.txt
--- response_body
file contents

=== TEST 12: wait + access_log (written in the log phase)
--- config
    location = /t { return 200 "ok\n"; }
--- request
GET /t?from=test12
--- wait: 0.1
--- access_log
"GET /t?from=test12 HTTP/1.1" 200
--- no_access_log
/nonexistent
--- response_body
ok
EOF
# per block: 1:3h+1b+1c+2nel=7 2:1c+2hl+1b=4 3:1c+2el=3 4:1c+1el=2
# 5:3*(1c+1b)=6 6:2 7:1+1el=2 8:1c+1h+1b=3 9:3 10:2 11:2 12:1c+1b+1al+1nal=4
passes('common sections', $r, 7 + 4 + 3 + 2 + 6 + 2 + 2 + 3 + 3 + 2 + 2 + 4);
like($r->{out}, qr/^ok \d+ - \S+ TEST 1: body, status, headers - header X-Absent not present/m,
     'test names carry the block name');

# 2. plan formula as written for the real module; repeat_each; master + workers
$r = run_spec(port => $PORT, use => 'use Test::Nginx::Socket;', head => <<'HEAD', data => <<'EOF');
repeat_each(2);
master_on();
workers(2);
log_level('warn');
plan tests => repeat_each() * (3 * blocks()) + 2;
HEAD
=== TEST 1: master + 2 workers
--- config
    location = /t { return 200 "pid\n"; }
--- request
GET /t
--- response_body
pid
--- no_error_log
[error]

=== TEST 2: error_log pattern checked per request (eval list)
--- config
    location /m { root html; }
--- request eval
["GET /m/a", "GET /m/b"]
--- error_code eval
[404, 404]
--- error_log
failed (2: No such file or directory)
EOF
# TEST 1: 3 per round; TEST 2: 2 codes + 2 error_log checks = 4 per round
# => 2*(3+4) = 14 = 2*(3*2) + 2
passes('plan tests => formula, repeat_each(2), master_on, workers(2)', $r, 14);
like($r->{out}, qr/^1\.\.14$/m, 'plan line as declared');

# 3. TEST_NGINX_LOAD_MODULES turns into load_module lines
$r = run_spec(port => $PORT, env => { TEST_NGINX_LOAD_MODULES => '/nonexistent/a_module.so  /nonexistent/b_module.so' },
              data => <<'EOF');
=== TEST 1: load_module of a missing .so makes nginx die
--- config
--- must_die
--- error_log
/nonexistent/a_module.so
EOF
passes('TEST_NGINX_LOAD_MODULES', $r, 2);

# 4. ONLY / SKIP / LAST are honoured (Test::Base)
$r = run_spec(port => $PORT, data => <<'EOF');
=== TEST 1: skipped
--- SKIP
--- config
    location = /t { return 500; }
--- request
GET /t

=== TEST 2: run
--- config
    location = /t { return 200 "x"; }
--- request
GET /t
--- response_body: x
--- LAST

=== TEST 3: after LAST
--- config
    location = /t { return 500; }
--- request
GET /t
EOF
passes('SKIP and LAST', $r, 2);

done_testing();
