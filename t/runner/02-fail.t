# Self-test: a wrong body, status, header or log expectation makes the block
# FAIL (non-zero exit, a "not ok" line naming the block and the check).
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use Test::More;
use RunnerHelper;

need_nginx();
my $PORT = 1991;

my $hello = <<'EOF';
--- config
    location = /t {
        add_header X-Foo bar;
        return 200 "hello\nworld\n";
    }
--- request
GET /t
EOF

my @cases = (
    {
        name => 'wrong response_body',
        data => "=== TEST 1: body\n$hello--- response_body\nhello\nthere\n",
        fail => [ qr/^not ok \d+ - \S+ TEST 1: body - response_body - response is expected/m ],
        also => [ qr/^# -there$/m, qr/^# \+world$/m, qr/strings begin to differ/ ],
        nfail => 1,
    },
    {
        name => 'response_body missing trailing newline',
        data => "=== TEST 1: body chomp\n$hello--- response_body chomp\nhello\nworld\n",
        fail => [ qr/^not ok \d+ - .*response_body - response is expected/m ],
        nfail => 1,
    },
    {
        name => 'wrong error_code',
        data => "=== TEST 1: status\n$hello--- error_code: 201\n",
        fail => [ qr/^not ok \d+ - \S+ TEST 1: status - status code ok/m ],
        also => [ qr/got: '200'/, qr/expected: '201'/ ],
        nfail => 1,
    },
    {
        name => 'default error_code is 200',
        data => <<'EOF',
=== TEST 1: implicit 200
--- config
    location = /t { return 404; }
--- request
GET /t
EOF
        fail => [ qr/^not ok \d+ - .*TEST 1: implicit 200 - status code ok/m ],
        nfail => 1,
    },
    {
        name => 'wrong response header value',
        data => "=== TEST 1: hdr\n$hello--- response_headers\nX-Foo: baz\n",
        fail => [ qr/^not ok \d+ - .*TEST 1: hdr - header X-Foo ok/m ],
        nfail => 1,
    },
    {
        name => 'missing response header',
        data => "=== TEST 1: hdr\n$hello--- response_headers\nX-Missing: 1\n",
        fail => [ qr/^not ok \d+ - .*header X-Missing ok/m ],
        nfail => 1,
    },
    {
        name => '!Header present',
        data => "=== TEST 1: neg\n$hello--- response_headers\n!X-Foo\n",
        fail => [ qr/^not ok \d+ - .*TEST 1: neg - header X-Foo not present in the raw headers/m ],
        nfail => 1,
    },
    {
        name => 'response_headers_like mismatch',
        data => "=== TEST 1: hl\n$hello--- response_headers_like\nX-Foo: ba\n",
        fail => [ qr/^not ok \d+ - .*header X-Foo like ok/m ],   # anchored ^ba$
        nfail => 1,
    },
    {
        name => 'response_body_like mismatch',
        data => "=== TEST 1: like\n$hello--- response_body_like: ^world\n",
        fail => [ qr/^not ok \d+ - .*response_body_like - response is expected/m ],
        nfail => 1,
    },
    {
        name => 'error_log line absent',
        data => "=== TEST 1: el\n$hello--- error_log\nthis line is never logged\n",
        fail => [ qr/^not ok \d+ - .*TEST 1: el - pattern "this line is never logged" should match a line in error.log/m ],
        nfail => 1,
    },
    {
        name => 'no_error_log line present',
        data => <<'EOF',
=== TEST 1: nel
--- config
    location /m { root html; }
--- request
GET /m/missing.txt
--- error_code: 404
--- no_error_log
[error]
EOF
        fail => [ qr/^not ok \d+ - .*TEST 1: nel - pattern "\[error\]" should not match any line in error.log but matches line ".*open\(\)/m ],
        nfail => 1,
    },
    {
        name => 'no_error_log qr// via eval',
        data => <<'EOF',
=== TEST 1: nel eval
--- config
    location /m { root html; }
--- request
GET /m/missing.txt
--- error_code: 404
--- no_error_log eval
[qr/No such file/, "never-there"]
EOF
        fail => [ qr/^not ok \d+ - .*should not match any line in error.log/m ],
        nfail => 1,
    },
    {
        name => 'must_die but nginx starts',
        data => <<'EOF',
=== TEST 1: md
--- config
    location = /t { return 200; }
--- must_die
EOF
        fail => [ qr/^not ok \d+ - .*TEST 1: md - die as expected/m ],
        nfail => 1,
    },
    {
        name => 'must_die with wrong error_log',
        data => <<'EOF',
=== TEST 1: md log
--- config
    bogus_directive_x on;
--- must_die
--- error_log
unknown directive "something_else"
EOF
        fail => [ qr/^not ok \d+ - .*TEST 1: md log - pattern "unknown directive "something_else"" should match/m ],
        nfail => 1,
    },
    {
        name => 'eval request list, second body wrong',
        data => <<'EOF',
=== TEST 1: list
--- config
    location = /a { return 200 "A"; }
    location = /b { return 200 "B"; }
--- request eval
["GET /a", "GET /b"]
--- response_body eval
["A", "X"]
EOF
        fail => [ qr/^not ok \d+ - .*TEST 1: list - response_body - response is expected \(repeated req 0, req 1\)/m ],
        nfail => 1,
    },
    {
        name => 'eval request list, second status wrong',
        data => <<'EOF',
=== TEST 1: list codes
--- config
    location = /a { return 200 "A"; }
    location = /b { return 403; }
--- request eval
["GET /a", "GET /b"]
--- error_code eval
[200, 200]
EOF
        fail => [ qr/^not ok 2 - .*status code ok/m ],
        nfail => 1,
    },
    {
        name => 'client timeout',
        data => <<'EOF',
=== TEST 1: slow
--- config
    location = /t {
        limit_rate 8;
        return 200 "0123456789012345678901234567890123456789012345678901234567890123456789";
    }
--- request
GET /t
--- timeout: 0.4
EOF
        fail => [ qr/^not ok \d+ - ERROR: client socket timed out - .*TEST 1: slow/m ],
        # like the real module, this failure sets Test::Builder's no_ending,
        # so the exit code stays 0; prove still fails the file on "not ok"
        exit_may_be_zero => 1,
    },
    {
        name => 'undefined $TEST_NGINX_ variable bails out',
        data => <<'EOF',
=== TEST 1: undefined env
--- config
    location = /t { return 200 "$TEST_NGINX_NOT_DEFINED_ANYWHERE"; }
--- request
GET /t
EOF
        fail => [ qr/Bail out!.*No environment TEST_NGINX_NOT_DEFINED_ANYWHERE defined/ ],
    },
    {
        name => 'plan count mismatch is reported',
        use  => 'use Test::Nginx::Socket;',
        head => 'plan tests => 3 * blocks();',
        data => "=== TEST 1: count\n$hello--- response_body\nhello\nworld\n",
        fail => [ qr/planned 3 tests but ran 2/ ],
    },
);

for my $c (@cases) {
    my $r = run_spec(port => $PORT, %$c);
    my $name = $c->{name};
    my $ok = $c->{exit_may_be_zero}
        ? ok($r->{fail} > 0, "$name: reports a failing test")
        : isnt($r->{exit}, 0, "$name: non-zero exit");
    for my $re (@{ $c->{fail} }, @{ $c->{also} || [] }) {
        $ok &= like($r->{out}, $re, "$name: output matches $re");
    }
    $ok &= is($r->{fail}, $c->{nfail}, "$name: exactly $c->{nfail} failing test(s)")
        if defined $c->{nfail};
    ok(!nginx_running($r->{servroot}), "$name: no nginx left running");
    diag($r->{out}) unless $ok;
}

done_testing();
