# Stickiness by client address. t/ssi.pl turns each SSI include into a real request whose
# client address (via realip) is taken from the URI, so one test request speaks for many
# clients: each output line is one client asking three times.
use Test::Nginx::Socket 'no_plan';

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
    $ENV{TEST_NGINX_REALIP_PORT} ||= $base + 20;
}


use FindBin;
require "$FindBin::Bin/ssi.pl";

no_shuffle();
run_tests();

__DATA__

=== TEST 1: every client keeps its node; 60 clients of one /24 spread over all nodes
The whole IPv4 address is hashed (stock ip_hash would put one /24 on one node).
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
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
main::clients(map { "10.20.30.$_" } 1 .. 60)
--- request
GET /t
--- response_body_like eval
qr/\A(?=.*n1)(?=.*n2)(?=.*n3)(?:(n\d)\1\1\n){60}\z/s
--- no_error_log
[error]



=== TEST 2: IPv6 clients are keyed by their /64
Each line mixes three addresses of one /64: they must land on one node.
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
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
main::ssi_page(map {
    my $net = sprintf "2001:db8:%x:%x", $_, $_ * 7;
    CORE::join "", map { qq{<!--# include virtual="/via/$net:$_" wait="yes" -->} } "0:0:0:1", "ffff:1:2:3", "abcd::9"
} 1 .. 40) . main::via_location()
--- request
GET /t
--- response_body_like eval
qr/\A(?=.*n1)(?=.*n2)(?=.*n3)(?:(n\d)\1\1\n){40}\z/s
--- no_error_log
[error]



=== TEST 3: weights: a weight=8 node owns most clients, the others still get some
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT weight=8;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
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
main::clients(map { "172.16.$_.9" } 1 .. 100)
--- request
GET /t
--- response_body_like eval
qr/\A(?=(?:.*?n1n1n1\n){65})(?=.*n2)(?=.*n3)(?:(n\d)\1\1\n){100}\z/s
--- no_error_log
[error]



=== TEST 4: the same client maps to the same node whatever the order of server lines
Two upstreams list the same servers in opposite order; each client must get the same
node from both (so several nginx instances agree).
--- http_config
    kylin_upstream forward {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
        server 127.0.0.1:$TEST_NGINX_B4_PORT;
    }
    kylin_upstream backward {
        server 127.0.0.1:$TEST_NGINX_B4_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; return 200 "n1"; }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; return 200 "n2"; }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; return 200 "n3"; }
    server { listen 127.0.0.1:$TEST_NGINX_B4_PORT; return 200 "n4"; }
    server {
        listen 127.0.0.1:$TEST_NGINX_REALIP_PORT;
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location /f { proxy_pass http://forward; }
        location /b { proxy_pass http://backward; }
    }
--- config eval
main::ssi_page(map {
    qq{<!--# include virtual="/via/f/10.7.$_.1" wait="yes" --><!--# include virtual="/via/b/10.7.$_.1" wait="yes" -->}
} 1 .. 50) . main::via_location()
--- request
GET /t
--- response_body_like eval
qr/\A(?=.*n1)(?=.*n4)(?:(n\d)\1\n){50}\z/s
--- no_error_log
[error]
