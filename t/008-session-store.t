# kylin_session_store: shared sessions (confirmed in a real Redis) may leave an overloaded
# node; node-local ones stay; malformed ids never reach Redis; a dead Redis changes nothing
# for clients. The test starts its own redis-server on a private port.
use Test::Nginx::Socket;
use MIME::Base64 ();

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
    $ENV{TEST_NGINX_REALIP_PORT} ||= $base + 20;
    $ENV{TEST_NGINX_REDIS_PORT} ||= $base + 31;
    $ENV{TEST_NGINX_DEAD_PORT} ||= $base + 29;
    $ENV{TEST_NGINX_PAD} = "." x 120;
}

use FindBin;
require "$FindBin::Bin/ssi.pl";
require "$FindBin::Bin/redis.pl";

our $SHARED = "5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE01";
our $LOCAL  = "10CA110CA110CA110CA110CA110CA101";
our $UUID   = "3b2c1c1e-1a2b-4c3d-9e8f-0123456789ab";
our $SPRING = MIME::Base64::encode_base64($UUID, "");

if (!have_redis()) {
    plan skip_all => "redis-server and redis-cli are needed";
} else {
    my $p = start_redis($ENV{TEST_NGINX_REDIS_PORT});
    redis_cmd($p, "SET", $SHARED, "tomcat-session");
    redis_cmd($p, "SET", "spring:session:sessions:expires:$UUID", "");
    redis_cmd($p, "SET", "app:sess:T3MPL4T3ID:v", "1");
    plan 'no_plan';
}

# One include to learn the verdict, then twelve concurrent requests of one client with `$sid`.
sub warm_then_flood {
    my ($sid) = @_;
    return main::ssi_page(
        qq{<!--# include virtual="/via/10.77.0.1/s/$sid" wait="yes" -->},
        CORE::join("", map { qq{<!--# include virtual="/via/10.77.0.1/s/$sid" -->} } 1 .. 12),
    ) . main::via_location();
}

sub slow_nodes {
    return <<'_EOC_' . main::client_server();
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { limit_rate 100; return 200 "$TEST_NGINX_PAD n1"; } }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; location / { limit_rate 100; return 200 "$TEST_NGINX_PAD n2"; } }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; location / { limit_rate 100; return 200 "$TEST_NGINX_PAD n3"; } }
_EOC_
}

our $SPREAD = qr/\A\.+ n\d\n(?!(?:.*?n1){6})(?!(?:.*?n2){6})(?!(?:.*?n3){6})(?:\.+ n\d){12}\n\z/s;
our $STAY   = qr/\A\.+ (n\d)\n(?:\.+ \1){12}\n\z/s;

no_shuffle();
no_root_location();
run_tests();

__DATA__

=== TEST 1: tomcat-redis-session-manager: a shared session spills over like a session-less request
--- http_config eval
<<'_EOC_' . main::slow_nodes()
    kylin_upstream kylin_nodes {
        kylin_balance requests;
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_REDIS_PORT format=tomcat timeout=2s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
_EOC_
--- config eval
main::warm_then_flood($main::SHARED)
--- request
GET /t
--- response_body_like eval
$main::SPREAD
--- no_error_log
[error]
[warn]
--- timeout: 20



=== TEST 2: a session not in Redis is node-local: it never leaves its node
--- http_config eval
<<'_EOC_' . main::slow_nodes()
    kylin_upstream kylin_nodes {
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_REDIS_PORT format=tomcat timeout=2s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
_EOC_
--- config eval
main::warm_then_flood($main::LOCAL)
--- request
GET /t
--- response_body_like eval
$main::STAY
--- no_error_log
[error]
[warn]
--- timeout: 20



=== TEST 3: a .jvmRoute suffix is stripped before the lookup (format=tomcat)
--- http_config eval
<<'_EOC_' . main::slow_nodes()
    kylin_upstream kylin_nodes {
        kylin_balance requests;
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_REDIS_PORT format=tomcat timeout=2s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
_EOC_
--- config eval
main::warm_then_flood("$main::SHARED.kylin1")
--- request
GET /t
--- response_body_like eval
$main::SPREAD
--- timeout: 20



=== TEST 4: ... but kept with format=tomcat-keep-route (then the key does not exist: local)
--- http_config eval
<<'_EOC_' . main::slow_nodes()
    kylin_upstream kylin_nodes {
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_REDIS_PORT format=tomcat-keep-route timeout=2s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
_EOC_
--- config eval
main::warm_then_flood("$main::SHARED.kylin1")
--- request
GET /t
--- response_body_like eval
$main::STAY
--- timeout: 20



=== TEST 5: Spring Session: Base64 cookie, <namespace>:sessions:expires:<id>
--- http_config eval
<<'_EOC_' . main::slow_nodes()
    kylin_upstream kylin_nodes {
        kylin_balance requests;
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_REDIS_PORT format=spring timeout=2s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
_EOC_
--- config eval
main::warm_then_flood($main::SPRING)
--- request
GET /t
--- response_body_like eval
$main::SPREAD
--- no_error_log
[error]
--- timeout: 20



=== TEST 6: a key template with the id in the middle
--- http_config eval
<<'_EOC_' . main::slow_nodes()
    kylin_upstream kylin_nodes {
        kylin_balance requests;
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_REDIS_PORT "key=app:sess:{id}:v" timeout=2s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
_EOC_
--- config eval
main::warm_then_flood("T3MPL4T3ID")
--- request
GET /t
--- response_body_like eval
$main::SPREAD
--- timeout: 20



=== TEST 7: "shared": every session may move, nothing is looked up
--- http_config eval
<<'_EOC_' . main::slow_nodes()
    kylin_upstream kylin_nodes {
        kylin_balance requests;
        kylin_session_store shared;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
_EOC_
--- config eval
main::warm_then_flood($main::LOCAL)
--- request
GET /t
--- response_body_like eval
$main::SPREAD
--- timeout: 20



=== TEST 8: an http-level kylin_session_store applies to upstreams without their own
--- http_config eval
<<'_EOC_' . main::slow_nodes()
    kylin_session_store redis://127.0.0.1:$TEST_NGINX_REDIS_PORT format=tomcat timeout=2s;
    kylin_upstream kylin_nodes {
        kylin_balance requests;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
_EOC_
--- config eval
main::warm_then_flood($main::SHARED)
--- request
GET /t
--- response_body_like eval
$main::SPREAD
--- timeout: 20



=== TEST 9: malformed session ids are never looked up
Oversized, wrong alphabet, too short, empty, not UTF-8, and duplicated (two malformed values).
A value that is no cookie value (oversized, empty, not cookie-octets) is no session
($kylin_session_state none); a cookie value that is not an id of the store's format is a
session the store cannot check: unknown (it stays on its server and keeps a learned route).
The last request reads the store's lookup count (zero).
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_REDIS_PORT format=tomcat timeout=2s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; return 200 "n1\n"; }
--- config
    location / {
        proxy_pass http://kylin_nodes;
        add_header X-State $kylin_session_state;
    }
    location = /status { kylin_status; }
--- request eval
["GET /a", "GET /b", "GET /c", "GET /d", "GET /e", "GET /f", "GET /status"]
--- more_headers eval
[
    "Cookie: JSESSIONID=" . ("A" x 300),
    "Cookie: JSESSIONID=5EC0DE5EC0DE*EC0DE5EC0DE5EC0DE01",
    "Cookie: JSESSIONID=5EC0DE",
    "Cookie: JSESSIONID=",
    "Cookie: a=1; JSESSIONID=5EC0DE5EC0DE5EC0DE5EC0DE5EC0\xff\xfe01",
    "Cookie: JSESSIONID=5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE0!; JSESSIONID=",
    "",
]
--- response_headers eval
["X-State: none", "X-State: unknown", "X-State: unknown", "X-State: none", "X-State: none", "X-State: unknown", "X-State:"]
--- response_body_like eval
[("n1") x 6, qr/"session_store":\{.*?"lookups":0,/]



=== TEST 10: Redis down: requests are served, sessions stay; the breaker opens and says so once
Six requests of one session against a port where nothing listens, fail_threshold=2: after
two failures (lookups, or the worker's periodic health check) the breaker is open and the
other requests are not asked. Then the status.
--- http_config
    kylin_upstream kylin_nodes {
        kylin_balance requests;
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_DEAD_PORT format=tomcat timeout=300ms fail_threshold=2 fail_backoff=60s share_routes=off;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; return 200 "n1\n"; }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; return 200 "n2\n"; }
--- config eval
main::ssi_page(
    (q{<!--# include virtual="/q" wait="yes" -->}) x 6,
    q{<!--# include virtual="/status" wait="yes" -->},
) . <<'_EOC_';
    location = /q { proxy_pass http://kylin_nodes; }
    location = /status { kylin_status; }
_EOC_
--- request
GET /t
--- more_headers
Cookie: JSESSIONID=5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE01
--- response_body_like eval
# The worker's periodic health check may be one of the two failures that open the breaker.
qr/\A(?:n\d\n\n){6}\{(?=.*"breaker":"open")(?=.*"errors":[2-9],)(?=.*"lookups":[0-2],)(?=.*"skipped":[4-6],)(?=.*"sticky":6\}).*\n\n\z/s
--- no_error_log eval
# nginx's own debug lines print request headers; the module's lines must not name sessions.
qr/\[(?:info|notice|warn|error|crit|alert|emerg)\].*5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE01/
--- grep_error_log eval: qr/session store redis:\/\/127\.0\.0\.1:\d+ failed 2 times in a row/
--- grep_error_log_out eval
"session store redis://127.0.0.1:$ENV{TEST_NGINX_DEAD_PORT} failed 2 times in a row\n"



=== TEST 11: kylin_session_store: bad URL, unknown format, credentials never echoed
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_store redis://admin:hunter2@127.0.0.1 format=tomcat;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid "kylin_session_store": "redis:\/\/\*\*\*\@127\.0\.0\.1" needs host:port in \S+nginx\.conf:\d+/



=== TEST 12: kylin_session_store: unknown format
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_store redis://127.0.0.1:6379 format=php;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid "kylin_session_store": unknown format "php"/



=== TEST 13: kylin_session_store twice in one upstream
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_store shared;
        kylin_session_store off;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin_session_store" directive is duplicate/



=== TEST 14: lookups on a kept-alive client connection (the second request and later)
The front proxies to the realip server over keepalive connections, so the lookups of the
second to fourth session run on a reused client connection; each must still be answered.
--- http_config
    upstream realip_keepalive {
        server 127.0.0.1:$TEST_NGINX_REALIP_PORT;
        keepalive 4;
    }
    kylin_upstream kylin_nodes {
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_REDIS_PORT format=tomcat timeout=2s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; return 200 "n1"; }
    server {
        listen 127.0.0.1:$TEST_NGINX_REALIP_PORT;
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location / { proxy_pass http://kylin_nodes; }
    }
--- config eval
main::ssi_page(map { sprintf q{<!--# include virtual="/ka/%032X" wait="yes" -->}, $_ } 1 .. 4) . <<'_EOC_';
    location ~ ^/ka/(?<sid>\w+)$ {
        rewrite ^ / break;
        proxy_pass http://realip_keepalive;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header X-Real-IP 10.44.0.1;
        proxy_set_header Cookie "JSESSIONID=$sid";
    }
_EOC_
--- request
GET /t
--- response_body
n1
n1
n1
n1
--- timeout: 5
--- no_error_log
[error]
