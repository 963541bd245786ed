# Hostile or broken input from clients: treated as "no session" (or as a session the store
# cannot check, which stays on its server) or routed normally; never a crash, never a Redis
# command for a malformed id. (The test starts its own redis-server.)
use Test::Nginx::Socket;

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
    $ENV{TEST_NGINX_REDIS_PORT} ||= $base + 31;
}

use FindBin;
require "$FindBin::Bin/redis.pl";

our $MANY = CORE::join "; ", map { "c$_=v$_" } 1 .. 300;
our $HUGE = "JSESSIONID=" . ("A1" x 3000);

if (!have_redis()) {
    plan skip_all => "redis-server and redis-cli are needed";
} else {
    start_redis($ENV{TEST_NGINX_REDIS_PORT});
    plan 'no_plan';
}

no_shuffle();
no_root_location();
run_tests();

__DATA__

=== TEST 1: hostile cookies and Authorization headers: served, nothing asked of Redis
--- http_config
    large_client_header_buffers 4 16k;
    kylin_upstream kylin_nodes {
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_REDIS_PORT format=tomcat timeout=2s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; return 200 "ok\n"; }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; return 200 "ok\n"; }
--- config
    location / {
        proxy_pass http://kylin_nodes;
        add_header X-State $kylin_session_state;
    }
    location = /status { kylin_status; }
--- request eval
[("GET /h") x 12, "GET /status"]
--- more_headers eval
[
    "Cookie: $main::MANY",
    "Cookie: $main::HUGE",
    "Cookie: JSESSIONID=%30%31%32%33%34%35%36%37%38%39%41%42%43%44%45%46",
    "Cookie: JSESSIONID=0123456789ABCDEF.\nX-Injected: 1",
    "Cookie: JSESSIONID=0123456789ABCDEF\r\nSET x 1",
    "Cookie: JSESSIONID=0123456789ABCDEF.node1.node2",
    "Cookie: =; ;;; JSESSIONID; =JSESSIONID; JSESSIONID==",
    "Cookie: JSESSIONID=\"\"",
    "Authorization: Basic",
    "Authorization: Basic !!!not-base64!!!",
    "Authorization: Bearer " . ("x" x 4000),
    "Authorization: Negotiate YII=\nCookie: JSESSIONID=*",
    "",
]
--- error_code eval
# nginx itself rejects the header line without a colon (the 5th request) before any balancing.
[(200) x 4, 400, (200) x 8]
--- response_headers eval
# No session where there is no well-formed cookie value; unknown (a session the store cannot
# check: it stays on its server) where the value is a cookie value but no Tomcat id.
["X-State: none", "X-State: none", "X-State: unknown", "X-State: unknown", "X-State:", "X-State: unknown",
 "X-State: unknown", "X-State: none", "X-State: none", "X-State: none", "X-State: none", "X-State: unknown", "X-State:"]
--- response_body_like eval
[(qr/\Aok\n\z/) x 4, qr/400 Bad Request/, (qr/\Aok\n\z/) x 7, qr/"session_store":\{.*?"lookups":0,/]
--- no_error_log
[alert]
[crit]
[emerg]



=== TEST 2: many Cookie headers and a session among hundreds of cookies
The session is found after 300 other cookies and in a second Cookie header.
--- http_config
    map $cookie_JSESSIONID $login_cookie { "" "JSESSIONID=0123456789ABCDEF0123456789ABCDEF; Path=/"; default ""; }
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { add_header Set-Cookie $login_cookie; return 200 "n1\n"; } }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; location / { add_header Set-Cookie $login_cookie; return 200 "n2\n"; } }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; location / { add_header Set-Cookie $login_cookie; return 200 "n3\n"; } }
--- config
    location / {
        proxy_pass http://kylin_nodes;
        add_header X-Route $kylin_route;
    }
--- request eval
["GET /login", "GET /q", "GET /q"]
--- more_headers eval
[
    "",
    "Cookie: $main::MANY; JSESSIONID=0123456789ABCDEF0123456789ABCDEF",
    "Cookie: a=1\nCookie: JSESSIONID=0123456789ABCDEF0123456789ABCDEF",
]
--- response_headers eval
["X-Route: sticky", "X-Route: learned", "X-Route: learned"]
--- no_error_log
[alert]
[crit]
