# Two worker processes under a master: load counters and learned routes are shared by the
# workers, and the status page sees the same numbers from either worker.
use Test::Nginx::Socket 'no_plan';

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
    $ENV{TEST_NGINX_REALIP_PORT} ||= $base + 20;
    $ENV{TEST_NGINX_PAD} = "." x 120;
}

use FindBin;
require "$FindBin::Bin/ssi.pl";

master_on();
workers(2);
no_shuffle();
no_root_location();
run_tests();

__DATA__

=== TEST 1: a session learned by one worker is followed by both
The login and the session requests reach the kylin upstream on separate connections, which
the two workers accept between them.
--- http_config
    map $cookie_JSESSIONID $login_cookie { "" "JSESSIONID=L0GIN1D; Path=/"; default ""; }
    kylin_upstream kylin_nodes {
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
    map { qq{<!--# include virtual="/via/10.66.$_.1/s/L0GIN1D" wait="yes" -->} } 1 .. 40,
) . main::via_location()
--- request
GET /t
--- response_body_like eval
qr/\A(n\d)\n(?:\1\n){40}\z/s
--- no_error_log
[error]



=== TEST 2: concurrent cookie-less requests spill with counts shared by both workers
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



=== TEST 3: the status page after traffic: nothing in flight, every request counted once
Ten sticky requests from one address, then the status page.
--- http_config eval
main::client_server() . <<'_EOC_'
    kylin_upstream kylin_nodes {
        zone kylin_nodes 64k;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT backup;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; return 200 "n1"; }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; return 200 "n2"; }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; return 200 "n3"; }
_EOC_
--- config eval
main::ssi_page(
    CORE::join("", map { q{<!--# include virtual="/via/10.8.8.8" wait="yes" -->} } 1 .. 10),
    q{<!--# include virtual="/status-via" wait="yes" -->},
) . main::via_location() . <<'_EOC_';
    location = /status-via {
        proxy_pass http://127.0.0.1:$TEST_NGINX_REALIP_PORT/status;
    }
_EOC_
--- request
GET /t
--- response_body_like eval
qr/\A(n[12])\1{9}\n\{(?=.*"decisions":\{"backup":0,"failover":0,"learned":0,"moved":0,"spilled":0,"sticky":10\},"in_flight":0,)(?=.*"requests":10,.*"sticky":10,)(?=.*"backup":true,.*?"in_flight":0,.*?"requests":0,)(?!.*"in_flight":[1-9]).*"version":1\}\n\n\z/s
--- no_error_log
[error]
