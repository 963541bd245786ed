# Failover: down servers, dead servers, max_fails, backup servers.
use Test::Nginx::Socket 'no_plan';

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
    $ENV{TEST_NGINX_REALIP_PORT} ||= $base + 20;
    # A port nothing listens on: connections to it are refused.
    $ENV{TEST_NGINX_DEAD_PORT} ||= $base + 29;
    $ENV{TEST_NGINX_PAD} = "." x 120;
}


use FindBin;
require "$FindBin::Bin/ssi.pl";

no_shuffle();
no_root_location();
run_tests();

__DATA__

=== TEST 1: a server marked down gets nothing; its clients stay sticky elsewhere
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT down;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; return 200 "n1"; }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; return 200 "n2"; }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; return 200 "n3"; }
    server {
        listen 127.0.0.1:$TEST_NGINX_REALIP_PORT;
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location / { proxy_pass http://kylin_nodes; }
    }
--- config eval
main::clients(map { "10.1.$_.1" } 1 .. 60)
--- request
GET /t
--- response_body_like eval
qr/\A(?!.*n2)(?=.*n1)(?=.*n3)(?:(n\d)\1\1\n){60}\z/s
--- no_error_log
[error]



=== TEST 2: a dead server: its clients fail over to one live server each, and stay there
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_DEAD_PORT max_fails=1 fail_timeout=30s;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; return 200 "n1"; }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; return 200 "n3"; }
    server {
        listen 127.0.0.1:$TEST_NGINX_REALIP_PORT;
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location / { proxy_pass http://kylin_nodes; }
    }
--- config eval
main::clients(map { "10.2.$_.1" } 1 .. 60)
--- request
GET /t
--- response_body_like eval
qr/\A(?=.*n1)(?=.*n3)(?:(n[13])\1\1\n){60}\z/s
--- error_log
connect() failed (111: Connection refused) while connecting to upstream
upstream server temporarily disabled while connecting to upstream
--- no_error_log
[alert]
[crit]



=== TEST 3: after max_fails the dead server is skipped without a new connect attempt
The first request finds the only primary dead and goes to the backup; the second, within
fail_timeout, goes straight to the backup.
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_DEAD_PORT max_fails=1 fail_timeout=60s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT backup;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; return 200 "n1\n"; }
--- config
    location / {
        proxy_pass http://kylin_nodes;
        add_header X-Upstream $upstream_addr always;
    }
--- request eval
["GET /first", "GET /second"]
--- response_body eval
["n1\n", "n1\n"]
--- response_headers eval
[
    "X-Upstream: 127.0.0.1:$ENV{TEST_NGINX_DEAD_PORT}, 127.0.0.1:$ENV{TEST_NGINX_B1_PORT}",
    "X-Upstream: 127.0.0.1:$ENV{TEST_NGINX_B1_PORT}",
]



=== TEST 4: backup servers get nothing while a primary server is usable
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT down;
        server 127.0.0.1:$TEST_NGINX_B3_PORT backup;
        server 127.0.0.1:$TEST_NGINX_B4_PORT backup;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; return 200 "n1"; }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; return 200 "n2"; }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; return 200 "n3"; }
    server { listen 127.0.0.1:$TEST_NGINX_B4_PORT; return 200 "n4"; }
    server {
        listen 127.0.0.1:$TEST_NGINX_REALIP_PORT;
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location / { proxy_pass http://kylin_nodes; }
    }
--- config eval
main::clients(map { "10.4.$_.1" } 1 .. 30)
--- request
GET /t
--- response_body_like eval
qr/\A(?:n1n1n1\n){30}\z/s
--- no_error_log
[error]



=== TEST 5: every primary down: clients go to backups, sticky among them
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT down;
        server 127.0.0.1:$TEST_NGINX_B2_PORT down;
        server 127.0.0.1:$TEST_NGINX_B3_PORT backup;
        server 127.0.0.1:$TEST_NGINX_B4_PORT backup;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; return 200 "n1"; }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; return 200 "n2"; }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; return 200 "n3"; }
    server { listen 127.0.0.1:$TEST_NGINX_B4_PORT; return 200 "n4"; }
    server {
        listen 127.0.0.1:$TEST_NGINX_REALIP_PORT;
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location / { proxy_pass http://kylin_nodes; }
    }
--- config eval
main::clients(map { "10.5.$_.1" } 1 .. 40)
--- request
GET /t
--- response_body_like eval
qr/\A(?=.*n3)(?=.*n4)(?:(n[34])\1\1\n){40}\z/s
--- no_error_log
[error]



=== TEST 6: no server usable at all: 502 and nginx's own "no live upstreams"
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT down;
        server 127.0.0.1:$TEST_NGINX_B2_PORT down;
    }
--- config
    location / {
        proxy_pass http://kylin_nodes;
    }
--- request
GET /
--- error_code: 502
--- error_log
no live upstreams while connecting to upstream



=== TEST 7: max_conns: a full sticky server passes its clients' overflow to their next servers
Twelve concurrent slow requests from one address, bounding off, max_conns=4 on each server:
each server holds at most four, and all twelve are answered.
--- http_config
    kylin_upstream kylin_nodes {
        kylin_balance_factor off;
        server 127.0.0.1:$TEST_NGINX_B1_PORT max_conns=4;
        server 127.0.0.1:$TEST_NGINX_B2_PORT max_conns=4;
        server 127.0.0.1:$TEST_NGINX_B3_PORT max_conns=4;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { limit_rate 100; return 200 "$TEST_NGINX_PAD n1"; } }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; location / { limit_rate 100; return 200 "$TEST_NGINX_PAD n2"; } }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; location / { limit_rate 100; return 200 "$TEST_NGINX_PAD n3"; } }
    server {
        listen 127.0.0.1:$TEST_NGINX_REALIP_PORT;
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location / { proxy_pass http://kylin_nodes; }
    }
--- config eval
main::ssi_page(CORE::join "", map { q{<!--# include virtual="/via/10.77.0.1" -->} } 1 .. 12) . main::via_location()
--- request
GET /t
--- response_body_like eval
qr/\A(?!(?:.*?n1){5})(?!(?:.*?n2){5})(?!(?:.*?n3){5})(?:\.+ n\d){12}\n\z/s
--- no_error_log
[error]
--- timeout: 20



=== TEST 8: with a zone: failover from the primary list to the backup list, and within it
Each list is locked on its own (the backup list only after the primary one is released):
the dead primary fails, then the request moves to the backups and stays on them, past the
dead backup its key prefers (it holds nearly all of the backup ring); the next request skips
both dead servers (their failures are in the zone) and goes straight to the live backup.
--- http_config
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; return 200 "n1\n"; }
    kylin_upstream kylin_nodes {
        zone kylin_nodes 64k;
        server 127.0.0.1:$TEST_NGINX_DEAD_PORT max_fails=1 fail_timeout=60s;
        server 127.0.0.1:$TEST_NGINX_DEAD_PORT backup weight=100 max_fails=1 fail_timeout=60s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT backup;
    }
--- config
    location / {
        proxy_pass http://kylin_nodes;
        add_header X-Upstream-Status $upstream_status always;
        add_header X-Upstream $upstream_addr always;
    }
--- request eval
["GET /first", "GET /second"]
--- response_body eval
["n1\n", "n1\n"]
--- response_headers_like eval
[
    "X-Upstream: 127\\.0\\.0\\.1:$ENV{TEST_NGINX_DEAD_PORT}, 127\\.0\\.0\\.1:$ENV{TEST_NGINX_DEAD_PORT}, 127\\.0\\.0\\.1:$ENV{TEST_NGINX_B1_PORT}
X-Upstream-Status: 502, 502, 200",
    "X-Upstream: 127\\.0\\.0\\.1:$ENV{TEST_NGINX_B1_PORT}
X-Upstream-Status: 200",
]
