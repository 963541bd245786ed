# kylin_hash, kylin_balance, kylin_balance_factor, kylin_session_cookie, kylin_session_routes: behaviour and
# the configuration errors of each.
use Test::Nginx::Socket 'no_plan';

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
    $ENV{TEST_NGINX_REALIP_PORT} ||= $base + 20;
}

use FindBin;
require "$FindBin::Bin/ssi.pl";

no_shuffle();
no_root_location();
run_tests();

__DATA__

=== TEST 1: kylin_hash: a user key keeps each user on one node whatever their address
Each line: one user from three different addresses.
--- http_config
    kylin_upstream kylin_nodes {
        kylin_hash $arg_user;
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
    my $u = "analyst$_";
    CORE::join "", map { qq{<!--# include virtual="/via/10.$_.0.1?user=$u" wait="yes" -->} } 1 .. 3
} 1 .. 30) . main::via_location()
--- request
GET /t
--- response_body_like eval
qr/\A(?=.*n1)(?=.*n2)(?=.*n3)(?:(n\d)\1\1\n){30}\z/s
--- no_error_log
[error]



=== TEST 2: kylin_session_cookie: another cookie name is the session
A session under the Kylin 5 style name is learned; JSESSIONID is just another cookie now.
--- http_config
    map $cookie_e1b8c2_session $login_cookie { "" "e1b8c2_session=NWY0ZTM; Path=/"; default ""; }
    kylin_upstream kylin_nodes {
        kylin_session_cookie e1b8c2_session;
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
    map { qq{<!--# include virtual="/via/10.66.$_.1/s/NWY0ZTM" wait="yes" -->} } 1 .. 20,
) . <<'_EOC_';
    location /via/ {
        rewrite "^/via/(?<kylin_addr>[^/]+)(?:/s/(?<kylin_sid>.+))?$" / break;
        proxy_pass http://127.0.0.1:$TEST_NGINX_REALIP_PORT;
        proxy_set_header X-Real-IP $kylin_addr;
        proxy_set_header Cookie "JSESSIONID=other; e1b8c2_session=$kylin_sid";
    }
_EOC_
--- request
GET /t
--- response_body_like eval
qr/\A(n\d)\n(?:\1\n){20}\z/s
--- no_error_log
[error]



=== TEST 3: kylin_session_routes with its own zone and timeout; $kylin_route
--- http_config
    map $cookie_JSESSIONID $login_cookie { "" "JSESSIONID=AB12; Path=/"; default ""; }
    kylin_upstream kylin_nodes {
        kylin_session_routes zone=kylin_test_routes:128k timeout=30m;
        kylin_balance_factor 1.5;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { add_header Set-Cookie $login_cookie; return 200 "n1\n"; } }
--- config
    location / {
        proxy_pass http://kylin_nodes;
        add_header X-Kylin-Route $kylin_route;
        add_header X-Kylin-Session $kylin_session_state;
    }
    location /none {
        add_header X-Kylin-Route "[$kylin_route]";
        return 200 "local\n";
    }
--- request eval
["GET /login", "GET /query", "GET /none"]
--- more_headers eval
["", "Cookie: JSESSIONID=AB12", ""]
--- response_body eval
["n1\n", "n1\n", "local\n"]
--- response_headers eval
[
    "X-Kylin-Route: sticky\nX-Kylin-Session: none",
    "X-Kylin-Route: learned\nX-Kylin-Session: unknown",
    "X-Kylin-Route: []",
]



=== TEST 4: kylin_balance_factor: not a number
--- http_config
    kylin_upstream kylin_nodes {
        kylin_balance_factor high;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid value "high" in "kylin_balance_factor" directive: it must be a number greater than 1 .* in \S+nginx\.conf:\d+/



=== TEST 5: kylin_balance_factor: not greater than 1
--- http_config
    kylin_upstream kylin_nodes {
        kylin_balance_factor 1.0;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid value "1\.0" in "kylin_balance_factor" directive/



=== TEST 6: kylin_balance_factor twice
--- http_config
    kylin_upstream kylin_nodes {
        kylin_balance_factor 1.25;
        kylin_balance_factor off;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin_balance_factor" directive is duplicate in \S+nginx\.conf:\d+/



=== TEST 7: kylin_session_cookie: not a cookie name
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_cookie "JSESSION ID";
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid cookie name "JSESSION ID" in "kylin_session_cookie" directive/



=== TEST 8: kylin_session_routes: zone too small
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_routes zone=r:8k;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid zone size "8k" in "kylin_session_routes": it must be at least 64k in \S+nginx\.conf:\d+/



=== TEST 9: kylin_session_routes: bad timeout
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_routes zone=r:1m timeout=soon;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid timeout "soon" in "kylin_session_routes"/



=== TEST 10: kylin_session_routes: no zone
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_routes timeout=1h;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin_session_routes" needs zone=name:size/



=== TEST 11: kylin_session_routes: unknown parameter
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_routes zone=r:1m idle=1h;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid parameter "idle=1h" in "kylin_session_routes"/



=== TEST 12: kylin_hash without a key
--- http_config
    kylin_upstream kylin_nodes {
        kylin_hash;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid number of arguments in "kylin_hash" directive/



=== TEST 13: kylin options in an upstream that does not use the kylin balancer
--- http_config
    upstream plain {
        server 127.0.0.1:1;
        kylin_balance_factor 1.5;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin_balance_factor" needs the kylin balancer: add "kylin;" to upstream "plain" or declare it with "kylin_upstream" in \S+nginx\.conf:\d+/



=== TEST 14: kylin options outside an upstream block
--- http_config
    kylin_session_cookie JSESSIONID;
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin_session_cookie" directive is not allowed here/



=== TEST 15: kylin_balance: not a known value
--- http_config
    kylin_upstream kylin_nodes {
        kylin_balance sessions;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid value "sessions" in "kylin_balance" directive: it must be "clients", "requests" or "off" in \S+nginx\.conf:\d+/



=== TEST 16: kylin_balance twice
--- http_config
    kylin_upstream kylin_nodes {
        kylin_balance clients;
        kylin_balance requests;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin_balance" directive is duplicate in \S+nginx\.conf:\d+/



=== TEST 17: kylin_balance clients with a request bound, in either order
--- http_config
    kylin_upstream one {
        kylin_balance clients;
        kylin_balance_factor 1.5;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin_balance_factor" cannot be used with "kylin_balance clients": it bounds requests, which only "kylin_balance requests" moves in \S+nginx\.conf:\d+/



=== TEST 18: kylin_balance off after a request bound
--- http_config
    upstream two {
        kylin;
        kylin_balance_factor 2;
        kylin_balance off;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin_balance off" cannot be used with "kylin_balance_factor", which bounds requests: use "kylin_balance requests" or remove "kylin_balance_factor" in \S+nginx\.conf:\d+/



=== TEST 19: kylin_balance clients places clients on up to 64 servers
--- http_config eval
"kylin_upstream many {\n        kylin_balance clients;\n" . CORE::join("", map { "        server 127.0.0.1:$_;\n" } 1 .. 65) . "    }\n"
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*upstream "many" has 65 servers: "kylin_balance clients" places clients on up to 64; use "kylin_balance requests" in \S+nginx\.conf:\d+/



=== TEST 20: kylin_balance requests, off and clients with "kylin_balance_factor off" are accepted
--- http_config
    kylin_upstream a { kylin_balance requests; kylin_balance_factor 1.5; server 127.0.0.1:1; }
    kylin_upstream b { kylin_balance off; server 127.0.0.1:1; }
    kylin_upstream c { kylin_balance_factor off; kylin_balance clients; server 127.0.0.1:1; }
--- config
    location = /st { kylin_status; }
--- request
GET /st
--- response_body_like eval
qr/"a":\{"balance":"requests","balance_factor":1\.5,.*"b":\{"balance":"off","balance_factor":null,.*"c":\{"balance":"clients","balance_factor":null,"bound_per_weight":null,.*"moved_clients":0,/s



=== TEST 21: kylin_balance in Prometheus text
--- http_config
    kylin_upstream a { kylin_balance requests; server 127.0.0.1:1; }
    kylin_upstream c { server 127.0.0.1:1; }
--- config
    location = /st { kylin_status; }
--- request
GET /st?format=prometheus
--- response_body_like eval
qr/(?=.*^kylin_upstream_balance\{upstream="a",balance="requests"\} 1$)(?=.*^kylin_upstream_balance\{upstream="a",balance="clients"\} 0$)(?=.*^kylin_upstream_balance\{upstream="c",balance="clients"\} 1$)(?=.*^kylin_upstream_moved_clients\{upstream="c"\} 0$)(?!.*^kylin_upstream_moved_clients\{upstream="a"\})(?=.*^kylin_server_clients_moved_in\{upstream="c",server="127\.0\.0\.1:1"\} 0$)(?=.*^kylin_server_decisions_total\{upstream="c",server="127\.0\.0\.1:1",route="moved"\} 0$)/sm



=== TEST 22: by default, a block of more than 64 servers balances requests
nginx -t and the start warn about it (at configuration time, before nginx opens its error
log: where that goes depends on the build, stderr for Debian's), so only the effect is checked.
--- http_config eval
"kylin_upstream many {\n" . CORE::join("", map { "        server 127.0.0.1:$_;\n" } 1 .. 65) . "    }\n"
--- config
    location = /st { kylin_status; }
--- request
GET /st
--- response_body_like eval
qr/"many":\{"balance":"requests","balance_factor":1\.25,/
