# Bounded load (`kylin_balance requests`, or any `kylin_balance_factor`): with slow servers and
# many concurrent requests from one client address, cookie-less requests spill over to the next
# servers in the client's order, while requests that carry a session (and everything when the
# factor is off) stay on the sticky server. The default, `kylin_balance clients`, moves whole
# clients instead (scripts/scenario_placement.py): TEST 7.
# The twelve includes of one line run concurrently (no wait="yes"); every server sends its
# answer slowly (limit_rate), so all twelve are in flight together.
use Test::Nginx::Socket 'no_plan';

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
    $ENV{TEST_NGINX_REALIP_PORT} ||= $base + 20;
    # 120 bytes of padding: at 100 bytes/s each answer takes about a second.
    $ENV{TEST_NGINX_PAD} = "." x 120;
}

use FindBin;
require "$FindBin::Bin/ssi.pl";

no_shuffle();
run_tests();

__DATA__

=== TEST 1: cookie-less requests spill over when their server is over its bound
Twelve concurrent requests, three equal servers, factor 1.25: no server may hold more than
ceil(1.25 * 12 / 3) = 5, so at least three servers answer.
--- http_config
    kylin_upstream kylin_nodes {
        kylin_balance requests;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
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
qr/\A(?!(?:.*?n1){6})(?!(?:.*?n2){6})(?!(?:.*?n3){6})(?:\.+ n\d){12}\n\z/s
--- no_error_log
[error]
[alert]
--- timeout: 20



=== TEST 2: with kylin_balance_factor off everything stays on the sticky server

--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
        kylin_balance_factor off;
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
qr/\A\.+ (n\d)(?:\.+ \1){11}\n\z/s
--- no_error_log
[error]
[alert]
--- timeout: 20



=== TEST 3: requests that carry a session never spill
The session is unknown to the balancer (not learned), so it may be node-local.
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
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
main::ssi_page(CORE::join "", map { q{<!--# include virtual="/via/10.77.0.1/s/F00D1E" -->} } 1 .. 12) . main::via_location()
--- request
GET /t
--- response_body_like eval
qr/\A\.+ (n\d)(?:\.+ \1){11}\n\z/s
--- no_error_log
[error]
[alert]
--- timeout: 20



=== TEST 4: a larger factor lets the sticky server take more before spilling
Factor 3 with three servers: the (k+1)-th concurrent request is admitted while the sticky
server's load is below ceil(3 * (k + 1) / 3) = k + 1, which always holds: all twelve stay.
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
        kylin_balance_factor 3;
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
qr/\A\.+ (n\d)(?:\.+ \1){11}\n\z/s
--- no_error_log
[error]
[alert]
--- timeout: 20



=== TEST 5: JDBC-style requests (Authorization: Basic, no session cookie) are session-less: they spill
Kylin's JDBC/ODBC drivers authenticate every request instead of keeping a session.
--- http_config
    kylin_upstream kylin_nodes {
        kylin_balance requests;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
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
--- more_headers
Authorization: Basic a3lsaW46a3lsaW4=
--- response_body_like eval
qr/\A(?!(?:.*?n1){6})(?!(?:.*?n2){6})(?!(?:.*?n3){6})(?:\.+ n\d){12}\n\z/s
--- no_error_log
[error]
[alert]
--- timeout: 20



=== TEST 6: ... but with a session cookie as well, the session decides: no spill
The session is unknown to the balancer (not learned), so it may be node-local.
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
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
main::ssi_page(CORE::join "", map { q{<!--# include virtual="/via/10.77.0.1/s/F00D1E" -->} } 1 .. 12) . main::via_location()
--- request
GET /t
--- more_headers
Authorization: Basic a3lsaW46a3lsaW4=
--- response_body_like eval
qr/\A\.+ (n\d)(?:\.+ \1){11}\n\z/s
--- no_error_log
[error]
[alert]
--- timeout: 20



=== TEST 7: by default (kylin_balance clients) single requests never spill
One busy client alone on its server: moving it would only make another server as busy, so
placement leaves it where its caches are, and no request is moved by itself either.
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
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
qr/\A\.+ (n\d)(?:\.+ \1){11}\n\z/s
--- no_error_log
[error]
[alert]
--- timeout: 20
