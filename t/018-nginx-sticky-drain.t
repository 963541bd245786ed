# nginx 1.29.6+: its own `sticky` in a kylin upstream, and `server ... drain`. kylin follows
# the server sticky names (like a learned route) and tells sticky which server it chose; a
# draining server serves only the sessions that live there. Skipped before 1.29.6.
use Test::Nginx::Socket 'no_plan';

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
}

use FindBin;
require "$FindBin::Bin/ssi.pl";

# Twenty requests with stickiness keys k=1..20 (kylin_hash $arg_k), each with query $extra.
sub twenty {
    my ($extra) = @_;
    return main::ssi_page(CORE::join "", map { qq{<!--# include virtual="/q?k=$_$extra" wait="yes" -->} } 1 .. 20)
        . "    location = /q { proxy_pass http://kylin_nodes; }\n";
}

sub nodes {
    my ($b2) = @_;
    return <<"_EOC_";
    upstream kylin_nodes {
        kylin;
        kylin_hash \$arg_k;
        sticky route \$arg_r;
        server 127.0.0.1:\$TEST_NGINX_B1_PORT route=a;
        server 127.0.0.1:\$TEST_NGINX_B2_PORT route=b $b2;
        server 127.0.0.1:\$TEST_NGINX_B3_PORT route=c;
    }
    server { listen 127.0.0.1:\$TEST_NGINX_B1_PORT; location / { return 200 "a"; } }
    server { listen 127.0.0.1:\$TEST_NGINX_B2_PORT; location / { return 200 "b"; } }
    server { listen 127.0.0.1:\$TEST_NGINX_B3_PORT; location / { return 200 "c"; } }
_EOC_
}

no_shuffle();
no_root_location();
run_tests();

__DATA__

=== TEST 1: control: without a sticky route the keys spread over the servers
--- skip_nginx: 2: < 1.29.6
--- http_config eval: main::nodes("")
--- config eval: main::twenty("")
--- request
GET /t
--- response_body_like eval
qr/\A(?=.*a)(?=.*b)(?=.*c)[abc]{20}\n\z/s



=== TEST 2: the server sticky names is followed, whatever the key
--- skip_nginx: 2: < 1.29.6
--- http_config eval: main::nodes("")
--- config eval: main::twenty("&r=b")
--- request
GET /t
--- response_body_like eval
qr/\Ab{20}\n\z/



=== TEST 3: a draining server takes no new requests
--- skip_nginx: 2: < 1.29.6
--- http_config eval: main::nodes("drain")
--- config eval: main::twenty("")
--- request
GET /t
--- response_body_like eval
qr/\A(?=.*a)(?=.*c)[ac]{20}\n\z/s



=== TEST 4: a draining server still serves the sessions sticky routes to it, and says so
--- skip_nginx: 3: < 1.29.6
--- http_config eval: main::nodes("drain")
--- config eval
main::twenty("&r=b") . "    location = /status { kylin_status; }\n"
--- request eval
["GET /t", "GET /status"]
--- response_body_like eval
[qr/\Ab{20}\n\z/, qr/"state":"draining"/]



=== TEST 5: sticky's cookie names the server kylin chose
Without kylin telling sticky its choice, sticky would set no cookie.
--- skip_nginx: 3: < 1.29.6
--- http_config
    upstream kylin_nodes {
        kylin;
        sticky cookie srv_id;
        server 127.0.0.1:$TEST_NGINX_B1_PORT route=a;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { return 200 "a"; } }
--- config
    location = /q { proxy_pass http://kylin_nodes; }
--- request
GET /q
--- response_headers_like
Set-Cookie: srv_id=a(?:;.*)?$
--- response_body chomp
a
