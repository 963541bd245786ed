# kylin_slow_start: its configuration errors, and that it changes nothing for servers that
# never came back (nginx started with them: every key keeps its server). The ramp itself is
# timed in scripts/scenario_slow_start.py.
use Test::Nginx::Socket 'no_plan';

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
}

use FindBin;
require "$FindBin::Bin/ssi.pl";

sub twenty {
    return main::ssi_page(CORE::join "", map { qq{<!--# include virtual="/q?k=$_" wait="yes" -->} } 1 .. 20)
        . "    location = /q { proxy_pass http://kylin_nodes; }\n"
        . "    location = /status { kylin_status; }\n";
}

sub nodes {
    my ($extra) = @_;
    return <<"_EOC_";
    kylin_upstream kylin_nodes {
        zone kylin_nodes 64k;
        kylin_hash \$arg_k;
        server 127.0.0.1:\$TEST_NGINX_B1_PORT;
        server 127.0.0.1:\$TEST_NGINX_B2_PORT;
        server 127.0.0.1:\$TEST_NGINX_B3_PORT;
        $extra
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

=== TEST 1: an invalid time
--- http_config eval: main::nodes("kylin_slow_start 30x;")
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid value "30x" in "kylin_slow_start" directive: it must be a time from 1ms to 1h \(for example 30s\) in \S+nginx\.conf:\d+/



=== TEST 2: longer than an hour
--- http_config eval: main::nodes("kylin_slow_start 2h;")
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid value "2h" in "kylin_slow_start" directive/



=== TEST 3: twice
--- http_config eval: main::nodes("kylin_slow_start 30s; kylin_slow_start 10s;")
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin_slow_start" directive is duplicate in \S+nginx\.conf:\d+/



=== TEST 4: without the kylin balancer
--- http_config
    upstream kylin_nodes {
        server 127.0.0.1:1;
        kylin_slow_start 30s;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin_slow_start" needs the kylin balancer/



=== TEST 5: servers nginx started with take their whole share at once, and no ramp shows
--- http_config eval: main::nodes("kylin_slow_start 1h;")
--- config eval
main::twenty() . "    location = /s { kylin_status; }\n"
--- request eval
["GET /t", "GET /s"]
--- response_body_like eval
[qr/\A(?=[^\n]*a)(?=[^\n]*b)(?=[^\n]*c)[abc]{20}\n\z/, qr/\A(?!.*"slow_start":[0-9]).*"slow_start":null/s]
