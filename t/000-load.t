# The module loads with load_module and proxies through kylin_upstream.
use Test::Nginx::Socket 'no_plan';

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{TEST_NGINX_B1_PORT} ||= $base + 11;
    $ENV{TEST_NGINX_B2_PORT} ||= $base + 12;
}

no_shuffle();
no_root_location();
run_tests();

__DATA__

=== TEST 1: kylin_upstream proxies to its server
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_B1_PORT;
        location / { return 200 "node1 $request_uri\n"; }
    }
--- config
    location /kylin/ {
        proxy_pass http://kylin_nodes;
    }
--- request
GET /kylin/api/projects
--- response_body
node1 /kylin/api/projects
--- error_code: 200
--- no_error_log
[error]
[alert]
[emerg]



=== TEST 2: kylin; inside a stock upstream block
--- http_config
    upstream kylin_nodes {
        kylin;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_B1_PORT;
        location / { return 200 "node1\n"; }
    }
--- config
    location / {
        proxy_pass http://kylin_nodes;
    }
--- request
GET /kylin/api/projects
--- response_body
node1
--- no_error_log
[error]
[warn]



=== TEST 3: proxy_pass naming the upstream before its kylin_upstream block
--- http_config
    server {
        listen 127.0.0.1:$TEST_NGINX_B2_PORT;
        location / { proxy_pass http://late_nodes; }
    }
    kylin_upstream late_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_B1_PORT;
        location / { return 200 "node1\n"; }
    }
--- config
    location / {
        proxy_pass http://127.0.0.1:$TEST_NGINX_B2_PORT;
    }
--- request
GET /
--- response_body
node1
--- no_error_log
[error]



=== TEST 4: stock directives inside kylin_upstream: server parameters, zone, keepalive
--- http_config
    kylin_upstream kylin_nodes {
        zone kylin_nodes 64k;
        server 127.0.0.1:$TEST_NGINX_B1_PORT weight=2 max_fails=3 fail_timeout=10s max_conns=100;
        server 127.0.0.1:$TEST_NGINX_B2_PORT down;
        server 127.0.0.1:1 backup;
        keepalive 8;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_B1_PORT;
        location / { return 200 "node1 connection=[$http_connection]\n"; }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_B2_PORT;
        location / { return 200 "node2\n"; }
    }
--- config
    location / {
        proxy_pass http://kylin_nodes;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
    }
--- request
GET /
--- response_body
node1 connection=[]
--- no_error_log
[error]
[warn]
