# kylin_health_check: configuration errors, and servers that fail their active health check
# (a 503, a body without the expected text, a refused connection, a server that accepts but
# never answers) take no requests; the status page and the Prometheus text say why.
use Test::Nginx::Socket 'no_plan';
use IO::Socket::INET ();

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
    $ENV{TEST_NGINX_DEAD_PORT} ||= $base + 29;
    $ENV{TEST_NGINX_HANG_PORT} ||= $base + 30;
}

# A server that accepts connections (the kernel does) and never answers.
our $Hang = IO::Socket::INET->new(Listen => 128, LocalAddr => "127.0.0.1:$ENV{TEST_NGINX_HANG_PORT}", ReuseAddr => 1)
    or die "cannot listen on $ENV{TEST_NGINX_HANG_PORT}: $!\n";

use FindBin;
require "$FindBin::Bin/ssi.pl";

# Waits $ms milliseconds (a request to the server that never answers, cut by its timeout),
# then twenty requests with stickiness keys k=1..20, then $after.
sub wait_then_twenty {
    my ($ms, $after) = @_;
    return main::ssi_page(
        qq{<!--# include virtual="/sleep" wait="yes" -->},
        CORE::join("", map { qq{<!--# include virtual="/q?k=$_" wait="yes" -->} } 1 .. 20),
        defined $after ? ($after) : (),
    ) . <<"_EOC_";
    location = /q { proxy_pass http://kylin_nodes; proxy_connect_timeout 300ms; proxy_read_timeout 300ms; }
    location = /status { kylin_status; }
    location = /sleep {
        proxy_pass http://127.0.0.1:\$TEST_NGINX_HANG_PORT;
        proxy_connect_timeout ${ms}ms;
        proxy_read_timeout ${ms}ms;
        error_page 502 504 =200 /empty;
    }
    location = /empty { return 200 ""; }
_EOC_
}

# Four nodes: a answers its health check UP, b with 503, c with 200 but "DOWN", d never
# answers; a fifth address refuses connections. $check is the health-check directive.
sub nodes {
    my ($check) = @_;
    return <<"_EOC_";
    kylin_upstream kylin_nodes {
        zone kylin_nodes 64k;
        kylin_hash \$arg_k;
        server 127.0.0.1:\$TEST_NGINX_B1_PORT;
        server 127.0.0.1:\$TEST_NGINX_B2_PORT;
        server 127.0.0.1:\$TEST_NGINX_B3_PORT;
        server 127.0.0.1:\$TEST_NGINX_HANG_PORT max_fails=0;
        server 127.0.0.1:\$TEST_NGINX_DEAD_PORT max_fails=0;
        $check
    }
    server { listen 127.0.0.1:\$TEST_NGINX_B1_PORT;
        location / { return 200 "a"; }
        location = /kylin/api/health { return 200 '{"status":"UP"}'; } }
    server { listen 127.0.0.1:\$TEST_NGINX_B2_PORT;
        location / { return 200 "b"; }
        location = /kylin/api/health { return 503 '{"status":"DOWN"}'; } }
    server { listen 127.0.0.1:\$TEST_NGINX_B3_PORT;
        location / { return 200 "c"; }
        location = /kylin/api/health { return 200 '{"status":"DOWN"}'; } }
_EOC_
}

no_shuffle();
no_root_location();
run_tests();

__DATA__

=== TEST 1: kylin_health_check needs a zone
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:1;
        kylin_health_check;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin_health_check" requires "zone" in upstream "kylin_nodes" .* in \S+nginx\.conf:\d+/



=== TEST 2: an invalid parameter names itself, the file and the line
--- http_config
    kylin_upstream kylin_nodes {
        zone kylin_nodes 64k;
        server 127.0.0.1:1;
        kylin_health_check interval=1s fails=0;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid parameter "fails=0" in "kylin_health_check" directive in \S+nginx\.conf:\d+/



=== TEST 3: a uri that is not a path
--- http_config
    kylin_upstream kylin_nodes {
        zone kylin_nodes 64k;
        server 127.0.0.1:1;
        kylin_health_check uri=kylin/api/health;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid parameter "uri=kylin\/api\/health": the uri must start with "\/".* in "kylin_health_check" directive in \S+nginx\.conf:\d+/



=== TEST 4: twice in one block
--- http_config
    kylin_upstream kylin_nodes {
        zone kylin_nodes 64k;
        server 127.0.0.1:1;
        kylin_health_check;
        kylin_health_check interval=2s;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin_health_check" directive is duplicate in \S+nginx\.conf:\d+/



=== TEST 5: in an upstream without the kylin balancer
--- http_config
    upstream kylin_nodes {
        zone kylin_nodes 64k;
        server 127.0.0.1:1;
        kylin_health_check;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin_health_check" needs the kylin balancer: add "kylin;" to upstream "kylin_nodes"/



=== TEST 6: control: without health checks the keys spread over the nodes that answer
--- http_config eval: main::nodes("")
--- config eval: main::wait_then_twenty(100)
--- request
GET /t
--- response_body_like eval
qr/\A\n(?=[^\n]*a)(?=[^\n]*b)(?=[^\n]*c)[abc]{20}\n\z/s
--- timeout: 20



=== TEST 7: only the node that passes its health check takes requests
--- http_config eval: main::nodes("kylin_health_check interval=100ms timeout=300ms body=UP;")
--- config eval: main::wait_then_twenty(700)
--- request
GET /t
--- response_body_like eval
qr/\A\na{20}\n\z/
--- error_log eval
[
    qr/\[warn\] .*kylin: upstream "kylin_nodes": server 127\.0\.0\.1:$ENV{TEST_NGINX_B1_PORT} is healthy \(health check passed, was unchecked\)/,
    qr/\[warn\] .*kylin: upstream "kylin_nodes": server 127\.0\.0\.1:$ENV{TEST_NGINX_B2_PORT} is unhealthy \(health check failed: status 503, was unchecked\)/,
    qr/\[warn\] .*kylin: upstream "kylin_nodes": server 127\.0\.0\.1:$ENV{TEST_NGINX_B3_PORT} is unhealthy \(health check failed: body, was unchecked\)/,
    qr/\[warn\] .*kylin: upstream "kylin_nodes": server 127\.0\.0\.1:$ENV{TEST_NGINX_HANG_PORT} is unhealthy \(health check failed: timeout, was unchecked\)/,
    qr/\[warn\] .*kylin: upstream "kylin_nodes": server 127\.0\.0\.1:$ENV{TEST_NGINX_DEAD_PORT} is unhealthy \(health check failed: connect, was unchecked\)/,
]
--- no_error_log
[alert]
[crit]
--- timeout: 20



=== TEST 8: the status page shows each server's health and why it failed
--- http_config eval: main::nodes("kylin_health_check interval=100ms timeout=300ms fails=2 body=UP;")
--- config eval: main::wait_then_twenty(700, q{<!--# include virtual="/status" wait="yes" -->})
--- request
GET /t
--- response_body_like eval
qr/\A\na{20}\n\{(?x)
    (?=.*"servers":\[
        \{"address":"127\.0\.0\.1:\d+","backup":false,[^{}]*"health":\{"checks":[1-9]\d*,"consecutive_failures":0,"consecutive_passes":[1-9]\d*,"failures":0,"healthy_since":\d+(?:\.\d+)?,"last_check":\d+(?:\.\d+)?,"last_check_ms":[\d.]+,"last_failure":null,"last_failure_reason":null,"state":"healthy"\},[^{}]*"state":"up",[^{}]*\},
        \{[^{}]*"health":\{"checks":[2-9]\d*,"consecutive_failures":[2-9]\d*,"consecutive_passes":0,"failures":[2-9]\d*,"healthy_since":null,[^{}]*"last_failure_reason":"status\ 503","state":"unhealthy"\},[^{}]*"state":"unhealthy",[^{}]*\},
        \{[^{}]*"health":\{[^{}]*"last_failure_reason":"body","state":"unhealthy"\},[^{}]*\},
        \{[^{}]*"health":\{[^{}]*"last_failure_reason":"timeout","state":"unhealthy"\},[^{}]*\},
        \{[^{}]*"health":\{[^{}]*"last_failure_reason":"connect","state":"unhealthy"\},[^{}]*\}\])
    (?=.*"live_weight":1,)
/s
--- timeout: 20



=== TEST 9: Prometheus: health state, checks, last failure reason
--- http_config eval: main::nodes("kylin_health_check interval=100ms timeout=300ms body=UP;")
--- config eval: main::wait_then_twenty(700, q{<!--# include virtual="/status?format=prometheus" wait="yes" -->})
--- request
GET /t
--- response_body_like eval
qr/\A\na{20}\n(?s)
    (?=.*^kylin_server_health\{upstream="kylin_nodes",server="127\.0\.0\.1:$ENV{TEST_NGINX_B1_PORT}",state="healthy"\}\ 1$)
    (?=.*^kylin_server_health\{upstream="kylin_nodes",server="127\.0\.0\.1:$ENV{TEST_NGINX_B2_PORT}",state="unhealthy"\}\ 1$)
    (?=.*^kylin_server_state\{upstream="kylin_nodes",server="127\.0\.0\.1:$ENV{TEST_NGINX_B2_PORT}",state="unhealthy"\}\ 1$)
    (?=.*^kylin_server_health_last_failure_info\{upstream="kylin_nodes",server="127\.0\.0\.1:$ENV{TEST_NGINX_DEAD_PORT}",reason="connect"\}\ 1$)
    (?=.*^kylin_server_health_checks_total\{upstream="kylin_nodes",server="127\.0\.0\.1:$ENV{TEST_NGINX_B1_PORT}"\}\ [1-9]\d*$)
/xm
--- timeout: 20



=== TEST 10: mandatory, status list and port: a node probed on another port
The health checks of all nodes go to b's port, where the check answers 503: with status=503
that passes, so every node that answers takes requests again.
--- http_config eval: main::nodes("kylin_health_check interval=100ms timeout=300ms status=200-299,503 port=$ENV{TEST_NGINX_B2_PORT} mandatory;")
--- config eval: main::wait_then_twenty(700)
--- request
GET /t
--- response_body_like eval
qr/\A\n(?=[^\n]*a)(?=[^\n]*b)(?=[^\n]*c)[abc]{20}\n\z/s
--- timeout: 20



=== TEST 11: every primary unhealthy: the healthy backup takes the requests
--- http_config
    kylin_upstream kylin_nodes {
        zone kylin_nodes 64k;
        kylin_hash $arg_k;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT backup;
        kylin_health_check interval=100ms;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT;
        location / { return 200 "a"; }
        location = /kylin/api/health { return 503; } }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT;
        location / { return 200 "b"; }
        location = /kylin/api/health { return 500; } }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT;
        location / { return 200 "c"; }
        location = /kylin/api/health { return 204; } }
--- config eval: main::wait_then_twenty(500)
--- request
GET /t
--- response_body_like eval
qr/\A\nc{20}\n\z/
--- timeout: 20



=== TEST 12: no healthy server at all: 502, as with every server down
--- http_config
    kylin_upstream kylin_nodes {
        zone kylin_nodes 64k;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        kylin_health_check interval=100ms;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT;
        location / { return 200 "a"; }
        location = /kylin/api/health { return 503; } }
--- config eval: main::wait_then_twenty(500)
--- request
GET /t
--- response_body_like eval
qr/\A\n(?:<html>.*?502 Bad Gateway.*?<\/html>\s*){20}\z/s
--- error_log eval
qr/no live upstreams while connecting to upstream/
--- timeout: 20
