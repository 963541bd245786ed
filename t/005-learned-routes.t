# Learned session routes: when a server's response creates a session, later requests with
# that session go to that server, whatever address they come from.
#
# Backends set "JSESSIONID=L0GIN1D" on a request without a session (a login), so the test
# knows the id without knowing which node answered. t/ssi.pl's /via/ADDR/s/SID sends a request
# from ADDR with that session cookie.
use Test::Nginx::Socket 'no_plan';

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
    $ENV{TEST_NGINX_REALIP_PORT} ||= $base + 20;
}

use FindBin;
require "$FindBin::Bin/ssi.pl";

# One login from 10.9.9.9, then each of 30 other clients once with the session `$sid`.
sub login_then_clients {
    my ($sid) = @_;
    return main::ssi_page(
        q{<!--# include virtual="/via/10.9.9.9" wait="yes" -->},
        map { qq{<!--# include virtual="/via/10.66.$_.1/s/$sid" wait="yes" -->} } 1 .. 30,
    ) . main::via_location();
}

no_shuffle();
run_tests();

__DATA__

=== TEST 1: a learned session follows its node from any address
--- http_config
    map $cookie_JSESSIONID $login_cookie { "" "JSESSIONID=L0GIN1D; Path=/kylin; HttpOnly"; default ""; }
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
main::login_then_clients("L0GIN1D")
--- request
GET /t
--- response_body_like eval
qr/\A(n\d)\n(?:\1\n){30}\z/s
--- no_error_log
[error]
[warn]



=== TEST 2: control: the same clients with a session nobody created spread over the nodes
--- http_config
    map $cookie_JSESSIONID $login_cookie { "" "JSESSIONID=L0GIN1D; Path=/kylin; HttpOnly"; default ""; }
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
main::login_then_clients("UNKN0WN")
--- request
GET /t
--- response_body_like eval
qr/\A(n\d)\n(?=.*n1)(?=.*n2)(?=.*n3)(?:n\d\n){30}\z/s
--- no_error_log
[error]



=== TEST 3: the learned node failing: its sessions fail over, each client to its own next node
Only n1 accepts logins (the others answer 503 and nginx passes the login on), so the session
is learned on n1; then n1 answers 503 to every session request (as a node going down would):
each request fails over to the first other node of its client's order, the same every time.
--- http_config
    map $cookie_JSESSIONID $login_cookie { "" "JSESSIONID=L0GIN1D; Path=/kylin; HttpOnly"; default ""; }
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT max_fails=100;
        server 127.0.0.1:$TEST_NGINX_B2_PORT max_fails=100;
        server 127.0.0.1:$TEST_NGINX_B3_PORT max_fails=100;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_B1_PORT;
        location / {
            if ($cookie_JSESSIONID) { return 503; }
            add_header Set-Cookie $login_cookie;
            return 200 "n1";
        }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_B2_PORT;
        location / { if ($cookie_JSESSIONID = "") { return 503; } return 200 "n2"; }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_B3_PORT;
        location / { if ($cookie_JSESSIONID = "") { return 503; } return 200 "n3"; }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_REALIP_PORT;
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location / {
            proxy_pass http://kylin_nodes;
            proxy_next_upstream error timeout http_503;
        }
    }
--- config eval
main::ssi_page(
    q{<!--# include virtual="/via/10.9.9.9" wait="yes" -->},
    map {
        my $c = qq{<!--# include virtual="/via/10.66.$_.1/s/L0GIN1D" wait="yes" -->};
        "$c$c"
    } 1 .. 30,
) . main::via_location()
--- request
GET /t
--- response_body_like eval
qr/\An1\n(?=.*n2)(?=.*n3)(?:(n[23])\1\n){30}\z/s



=== TEST 4: a session deleted by its node (Max-Age=0) is forgotten
After the logout, the session's requests follow their clients' own nodes again.
--- http_config
    map $cookie_JSESSIONID $login_cookie {
        ""       "JSESSIONID=L0GIN1D; Path=/kylin";
        default  "JSESSIONID=; Max-Age=0; Path=/kylin";
    }
    map $arg_logout $logout_cookie { "" ""; default $login_cookie; }
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { add_header Set-Cookie $logout_cookie; return 200 "n1"; } }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; location / { add_header Set-Cookie $logout_cookie; return 200 "n2"; } }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; location / { add_header Set-Cookie $logout_cookie; return 200 "n3"; } }
    server {
        listen 127.0.0.1:$TEST_NGINX_REALIP_PORT;
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location / { proxy_pass http://kylin_nodes; }
    }
--- config eval
main::ssi_page(
    q{<!--# include virtual="/via/10.9.9.9?logout=1" wait="yes" -->},
    (map { qq{<!--# include virtual="/via/10.66.$_.1/s/L0GIN1D" wait="yes" -->} } 1 .. 10),
    q{<!--# include virtual="/via/10.9.9.9/s/L0GIN1D?logout=1" wait="yes" -->},
    (map { qq{<!--# include virtual="/via/10.66.$_.1/s/L0GIN1D" wait="yes" -->} } 1 .. 30),
) . main::via_location()
--- request
GET /t
--- response_body_like eval
qr/\A(n\d)\n(?:\1\n){10}(?:n\d\n)(?=.*n1)(?=.*n2)(?=.*n3)(?:n\d\n){30}\z/s



=== TEST 5: a session created again on another node moves there at once
Only n1 creates the session at the login (`?login=1`), and only n2 creates it again at the
relogin (`?relogin=1`; 30 addresses, so that some land on n2): the session's requests go to
n1, then, with no pause, to n2. The whole page takes well under a second, so the worker's
memory of the routes it looked up this second is usually still fresh when the route moves:
it must not outlive the change (a memory that ignored the change would fail here unless a
second boundary fell in between; across processes, see the property tests in routes.rs).
--- http_config
    map $arg_login $login_cookie { "1" "JSESSIONID=L0GIN1D; Path=/kylin"; default ""; }
    map $arg_relogin $relogin_cookie { "1" "JSESSIONID=L0GIN1D; Path=/kylin"; default ""; }
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { add_header Set-Cookie $login_cookie; return 200 "n1"; } }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; location / { add_header Set-Cookie $relogin_cookie; return 200 "n2"; } }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; location / { return 200 "n3"; } }
    server {
        listen 127.0.0.1:$TEST_NGINX_REALIP_PORT;
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location / { proxy_pass http://kylin_nodes; }
    }
--- config eval
main::ssi_page(
    (map { qq{<!--# include virtual="/via/10.9.$_.9?login=1" wait="yes" -->} } 1 .. 30),
    (map { qq{<!--# include virtual="/via/10.66.$_.1/s/L0GIN1D" wait="yes" -->} } 1 .. 10),
    (map { qq{<!--# include virtual="/via/10.8.$_.8?relogin=1" wait="yes" -->} } 1 .. 30),
    (map { qq{<!--# include virtual="/via/10.66.$_.1/s/L0GIN1D" wait="yes" -->} } 1 .. 10),
) . main::via_location()
--- request
GET /t
--- response_body_like eval
qr/\A(?:n\d\n){30}(?:n1\n){10}(?:n\d\n){30}(?:n2\n){10}\z/s
--- no_error_log
[error]
[warn]
