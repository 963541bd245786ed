# Redis Sentinel: sentinel=NAME names the master through real Sentinels. A real master
# watched by a real Sentinel (the failover itself: scripts/scenario_sentinel.py).
use Test::Nginx::Socket;

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
    $ENV{TEST_NGINX_MASTER_PORT} ||= $base + 54;
    $ENV{TEST_NGINX_SENTINEL_PORT} ||= $base + 55;
}

use FindBin;
require "$FindBin::Bin/redis.pl";

our $SHARED = "5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE01";

if (!have_redis()) {
    plan skip_all => "redis-server and redis-cli are needed";
} else {
    my $m = start_redis($ENV{TEST_NGINX_MASTER_PORT});
    redis_cmd($m, "SET", $SHARED, "tomcat-session");
    start_sentinel($ENV{TEST_NGINX_SENTINEL_PORT}, "kylinmaster", $m);
    plan 'no_plan';
}

no_shuffle();
no_root_location();
run_tests();

__DATA__

=== TEST 1: Redis Sentinel: the Sentinel names the master, lookups and route writes go there
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_SENTINEL_PORT sentinel=kylinmaster timeout=1s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { return 200 "n1"; } }
--- config
    location / {
        proxy_pass http://kylin_nodes;
        add_header X-State $kylin_session_state;
    }
    location = /status { kylin_status; }
--- request eval
["GET /a", "GET /status"]
--- more_headers eval
["Cookie: JSESSIONID=$main::SHARED", ""]
--- response_headers eval
["X-State: shared", ""]
--- response_body_like eval
["n1", qr/"session_store":\{(?=.*"errors":0,)(?=.*"lookups":1,)/]



=== TEST 2: a master name the Sentinel does not know: lookups fail, sessions stay
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_SENTINEL_PORT sentinel=nosuchmaster timeout=1s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { return 200 "n1"; } }
--- config
    location / {
        proxy_pass http://kylin_nodes;
        add_header X-State $kylin_session_state;
    }
    location = /status { kylin_status; }
--- request eval
["GET /a", "GET /status"]
--- more_headers eval
["Cookie: JSESSIONID=$main::SHARED", ""]
--- response_headers eval
["X-State: unknown", ""]
--- response_body_like eval
["n1", qr/"session_store":\{(?=.*"errors":[1-9],)(?=.*"lookups":1,)/]
