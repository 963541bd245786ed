# Connection reuse to the nodes: the kylin balancer under nginx's upstream keepalive, in every
# form nginx accepts. A node answers with its own connection number ($connection), so four
# requests that reuse one kept-alive connection read one number four times (each included
# response is followed by the SSI page's blank line).
use Test::Nginx::Socket 'no_plan';

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
}

use FindBin;
require "$FindBin::Bin/ssi.pl";

our $REUSED = qr/\A(\d+)\n\n(?:\1\n\n){3}\z/s;

sub four_requests {
    return main::ssi_page((q{<!--# include virtual="/k" wait="yes" -->}) x 4) . <<'_EOC_';
    location = /k {
        proxy_pass http://kylin_nodes;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
    }
_EOC_
}

no_shuffle();
no_root_location();
run_tests();

__DATA__

=== TEST 1: kylin_upstream with keepalive: one connection serves four requests
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        keepalive 4;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { return 200 "$connection\n"; } }
--- config eval
main::four_requests()
--- request
GET /t
--- response_body_like eval
$main::REUSED



=== TEST 2: kylin; then keepalive in a stock upstream: reused
--- http_config
    upstream kylin_nodes {
        kylin;
        keepalive 4;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { return 200 "$connection\n"; } }
--- config eval
main::four_requests()
--- request
GET /t
--- response_body_like eval
$main::REUSED



=== TEST 3: keepalive before kylin_upstream's servers, with a zone: reused
--- http_config
    kylin_upstream kylin_nodes {
        zone kylin_nodes 64k;
        keepalive 4;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { return 200 "$connection\n"; } }
--- config eval
main::four_requests()
--- request
GET /t
--- response_body_like eval
$main::REUSED



=== TEST 4: control: without keepalive (before nginx 1.29.7) every request opens a connection
--- skip_nginx: 2: >= 1.29.7
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { return 200 "$connection\n"; } }
--- config eval
main::four_requests()
--- request
GET /t
--- response_body_like eval
qr/\A(\d+)\n\n(?!\1\n)(\d+)\n\n(?!\1\n|\2\n)(\d+)\n\n(?!\1\n|\2\n|\3\n)\d+\n\n\z/s



=== TEST 5: nginx 1.29.7+ keeps connections alive by default: kylin_upstream reuses them
--- skip_nginx: 2: < 1.29.7
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { return 200 "$connection\n"; } }
--- config eval
main::four_requests()
--- request
GET /t
--- response_body_like eval
$main::REUSED



=== TEST 6: nginx 1.29.7+: keepalive before kylin; in a stock upstream is accepted and reused
Since 1.29.7 keepalive wraps every upstream's balancer once the configuration is read, so the
order of the two directives no longer matters (before, nginx -t refuses it: t/003).
--- skip_nginx: 2: < 1.29.7
--- http_config
    upstream kylin_nodes {
        keepalive 4;
        kylin;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { return 200 "$connection\n"; } }
--- config eval
main::four_requests()
--- request
GET /t
--- response_body_like eval
$main::REUSED
