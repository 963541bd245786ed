# The module beside ordinary nginx features: cache processes, rate limits and access control,
# a least-privilege Redis user, an empty kylin_hash value. Each test starts from a finding of
# issue #12 and failed before its fix.
use Test::Nginx::Socket;

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
    $ENV{TEST_NGINX_REALIP_PORT} ||= $base + 20;
    $ENV{TEST_NGINX_REDIS_PORT} ||= $base + 50;
    $ENV{TEST_NGINX_IDLE_REDIS_PORT} ||= $base + 51;
    $ENV{TEST_NGINX_DEAD_PORT} ||= $base + 52;
}

use FindBin;
require "$FindBin::Bin/ssi.pl";
require "$FindBin::Bin/redis.pl";

if (!have_redis()) {
    plan skip_all => "redis-server and redis-cli are needed";
} else {
    my $p = start_redis($ENV{TEST_NGINX_REDIS_PORT});
    redis_cmd($p, "SET", "5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE01", "tomcat-session");
    # The least-privilege user of the README's "Redis user" section.
    redis_cmd($p, qw(ACL SETUSER kylin on >Kylin-Test-Pw resetkeys %R~* ~kylin:* resetchannels -@all
        +exists +get +set +ping +hello +auth +select));
    # A user that may not run EXISTS: every lookup fails, every health check succeeds.
    redis_cmd($p, qw(ACL SETUSER noexists on >Kylin-Test-Pw resetkeys %R~* ~kylin:* resetchannels -@all
        +get +set +ping +hello +auth +select));
    # A Redis that closes connections idle for a second (as proxies and managed Redis do).
    my $idle = start_redis($ENV{TEST_NGINX_IDLE_REDIS_PORT}, "--timeout", "1");
    redis_cmd($idle, "SET", "5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE02", "tomcat-session");
    plan 'no_plan';
}

master_on();
workers(2);
no_shuffle();
no_root_location();
run_tests();

__DATA__

=== TEST 1: with a cache, the cache manager and loader run beside a Redis session store
Store health checks run in worker processes only: the cache processes have no thread pool
queues, and a task posted there crashed them.
--- http_config
    proxy_cache_path cache keys_zone=kylin_cache:1m loader_sleep=10ms loader_files=1;
    kylin_upstream kylin_nodes {
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_REDIS_PORT timeout=2s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { return 200 "n1"; } }
--- config
    location = /t {
        proxy_cache kylin_cache;
        proxy_pass http://kylin_nodes;
    }
--- wait: 1.5
--- request
GET /t
--- response_body chomp
n1
--- no_error_log
exited on signal
[alert]



=== TEST 2: requests that limit_req or deny reject cause no Redis lookup
Five made-up sessions that would each be looked up (no route known, routes shared): only the
one request that passes the rate limit is.
--- http_config
    limit_req_zone $binary_remote_addr zone=one:1m rate=1r/m;
    kylin_upstream kylin_nodes {
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_REDIS_PORT timeout=2s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { return 200 "n1"; } }
--- config
    location /limited { limit_req zone=one; proxy_pass http://kylin_nodes; }
    location /denied { deny all; proxy_pass http://kylin_nodes; }
    location = /status { kylin_status; }
--- request eval
["GET /limited", "GET /limited", "GET /limited", "GET /denied", "GET /denied", "GET /status"]
--- more_headers eval
[(map { sprintf "Cookie: JSESSIONID=F0RGED%026d", $_ } 1 .. 5), ""]
--- error_code eval
[200, 503, 503, 403, 403, 200]
--- response_body_like eval
["n1", qr/503/, qr/503/, qr/403/, qr/403/, qr/"session_store":\{.*?"lookups":1,/]



=== TEST 3: a least-privilege Redis user: health checks and lookups work
The user may run only EXISTS, GET, SET (and connection commands), read every key and write
only kylin:* keys (the README's ACL). The first request takes over a second, so that the
worker's first health check has run before the status is read.
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_store redis://kylin:Kylin-Test-Pw@127.0.0.1:$TEST_NGINX_REDIS_PORT timeout=2s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_B1_PORT;
        location /slow { limit_rate 100; return 200 "........................................................................................................................"; }
        location / { return 200 "n1"; }
    }
--- config
    location / {
        proxy_pass http://kylin_nodes;
        add_header X-State $kylin_session_state;
    }
    location = /status { kylin_status; }
--- request eval
["GET /slow", "GET /a", "GET /status"]
--- more_headers eval
["", "Cookie: JSESSIONID=5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE01", ""]
--- response_headers eval
["X-State: none", "X-State: shared", ""]
--- response_body_like eval
[qr/^\.+$/, "n1", qr/"session_store":\{(?=.*"breaker":"closed")(?=.*"errors":0,)(?=.*"lookups":1,)/]
--- no_error_log
NOPERM



=== TEST 4: an empty kylin_hash value falls back to the client address
Without X-Forwarded-For, the upstream hashed on it places each client where the one hashed on
the address does (and so spreads clients over all servers).
--- http_config
    kylin_upstream by_header {
        kylin_hash $http_x_forwarded_for;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
    kylin_upstream by_address {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; return 200 "n1,"; }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; return 200 "n2,"; }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; return 200 "n3,"; }
    server {
        listen 127.0.0.1:$TEST_NGINX_REALIP_PORT;
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location /a { proxy_pass http://by_header; }
        location /b { proxy_pass http://by_address; }
    }
--- config eval
main::ssi_page(
    map { qq{<!--# include virtual="/via/a/10.1.$_.7" wait="yes" --><!--# include virtual="/via/b/10.1.$_.7" wait="yes" -->} } 1 .. 24
) . main::via_location()
--- request
GET /t
--- response_body_like eval
qr/\A(?=.*n1,)(?=.*n2,)(?=.*n3,)(?:(n\d),\1,\n){24}\z/s
--- no_error_log
[error]



=== TEST 5: a session id the store cannot check keeps its learned route
A Tomcat id in front of format=spring: the store cannot say whether it is shared, so it is
unknown: it stays on the server that created it, whatever the client address.
--- http_config
    map $cookie_JSESSIONID $login_cookie { "" "JSESSIONID=5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE77; Path=/"; default ""; }
    kylin_upstream kylin_nodes {
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_REDIS_PORT format=spring timeout=2s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { add_header Set-Cookie $login_cookie; return 200 "n1"; } }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; location / { add_header Set-Cookie $login_cookie; return 200 "n2"; } }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; location / { add_header Set-Cookie $login_cookie; return 200 "n3"; } }
    server {
        listen 127.0.0.1:$TEST_NGINX_REALIP_PORT;
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location / { proxy_pass http://kylin_nodes; }
    }
--- config eval
main::ssi_page(
    q{<!--# include virtual="/via/10.9.9.9" wait="yes" -->},
    map { qq{<!--# include virtual="/via/10.66.$_.1/s/5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE77" wait="yes" -->} } 1 .. 20,
) . main::via_location()
--- request
GET /t
--- response_body_like eval
qr/\A(n\d)\n(?:\1\n){20}\z/s
--- no_error_log
[error]



=== TEST 6: a connection Redis closed while idle is replaced, not counted as a failure
One pool thread, so the health checks and the lookup share its connection; Redis closes it
after a second idle. The second request takes over two seconds. (A generous timeout: the
lookup may queue behind a health check in the one thread, under valgrind too.)
--- main_config
    thread_pool default threads=1;
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_IDLE_REDIS_PORT timeout=2s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_B1_PORT;
        location /slow { limit_rate 50; return 200 "........................................................................................................................"; }
        location / { return 200 "n1"; }
    }
--- config
    location / {
        proxy_pass http://kylin_nodes;
        add_header X-State $kylin_session_state;
    }
    location = /status { kylin_status; }
--- request eval
["GET /a", "GET /slow", "GET /b", "GET /status"]
--- more_headers eval
["Cookie: JSESSIONID=5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE02", "", "Cookie: JSESSIONID=5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE03", ""]
--- response_headers eval
["X-State: shared", "X-State: none", "X-State: local", ""]
--- response_body_like eval
["n1", qr/^\.+$/, "n1", qr/"session_store":\{(?=.*"breaker":"closed")(?=.*"errors":0,)(?=.*"timeouts":0,)(?=.*"lookups":2,)/]
--- timeout: 10



=== TEST 7: route writes go through the circuit breaker
Ten logins against a Redis that is down: two failed calls open the breaker, and the other
route writes are not attempted (they are written once the store is back).
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_DEAD_PORT timeout=200ms fail_threshold=2 fail_backoff=60s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { add_header Set-Cookie "JSESSIONID=$arg_id; Path=/"; return 200 "n1"; } }
--- config
    location / { proxy_pass http://kylin_nodes; }
    location = /status { kylin_status; }
--- request eval
[(map { "GET /login?id=5EC0DE5EC0DE5EC0DE5EC0DE5EC0D${_}00" } 10 .. 19), "GET /status"]
--- response_body_like eval
[("n1") x 10, qr/"session_store":\{(?=.*"breaker":"open")(?=.*"errors":[2-4],)(?=.*"skipped":(?:[6-9]|10),)/]



=== TEST 8: a health check that succeeds does not close a breaker that lookups opened
The user may not run EXISTS: three lookups fail and open the breaker; the health check three
seconds later succeeds (SET and GET are allowed), and the breaker stays open.
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_store redis://noexists:Kylin-Test-Pw@127.0.0.1:$TEST_NGINX_REDIS_PORT timeout=2s fail_threshold=3 fail_backoff=60s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_B1_PORT;
        location /slow { limit_rate 30; return 200 "........................................................................................................................"; }
        location / { return 200 "n1"; }
    }
--- config
    location / { proxy_pass http://kylin_nodes; }
    location = /status { kylin_status; }
--- request eval
["GET /a", "GET /b", "GET /c", "GET /slow", "GET /status"]
--- more_headers eval
[(map { "Cookie: JSESSIONID=5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE2$_" } 1 .. 3), "", ""]
--- response_body_like eval
["n1", "n1", "n1", qr/^\.+$/, qr/"session_store":\{(?=.*"breaker":"open")(?=.*"errors":3,)(?=.*"lookups":3,)/]
--- timeout: 10
