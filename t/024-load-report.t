# kylin_load_report: configuration errors; the status page and the Prometheus text show each
# server's report (value, age, state, whether it is used); a client whose home reports
# saturation moves off it, and a report that is stale, missing or calm changes nothing.
use Test::Nginx::Socket 'no_plan';
use IO::Socket::INET ();

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
    $ENV{TEST_NGINX_DEAD_PORT} ||= $base + 29;
    $ENV{TEST_NGINX_HANG_PORT} ||= $base + 30;
}

# A server that accepts connections (the kernel does) and never answers: requests to it,
# cut by their timeout, are how a node takes its time.
our $Hang = IO::Socket::INET->new(Listen => 128, LocalAddr => "127.0.0.1:$ENV{TEST_NGINX_HANG_PORT}", ReuseAddr => 1)
    or die "cannot listen on $ENV{TEST_NGINX_HANG_PORT}: $!\n";

use FindBin;
require "$FindBin::Bin/ssi.pl";

# $n requests of client k=1 one after the other (each takes about 150 ms on its node), after
# waiting $ms, then $after.
sub client_requests {
    my ($n, $ms, $after) = @_;
    return main::ssi_page(
        qq{<!--# include virtual="/sleep" wait="yes" -->},
        CORE::join("", map { qq{<!--# include virtual="/q?k=1" wait="yes" -->} } 1 .. $n),
        defined $after ? ($after) : (),
    ) . <<"_EOC_";
    location = /q { proxy_pass http://kylin_nodes; proxy_read_timeout 2s; }
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

# Node a (weight 50: nearly every key's home) and node c. Each answers a request after about
# 150 ms with its letter. $a_metrics and $c_metrics are the locations that serve their
# /kylin/api/prometheus; $report is the kylin_load_report directive (or none).
sub nodes {
    my ($report, $a_metrics, $c_metrics, $extra) = @_;
    $extra //= "";
    return <<"_EOC_";
    limit_req_zone \$server_port zone=once:1m rate=1r/m;
    kylin_upstream kylin_nodes {
        zone kylin_nodes 64k;
        kylin_hash \$arg_k;
        server 127.0.0.1:\$TEST_NGINX_B1_PORT weight=50;
        server 127.0.0.1:\$TEST_NGINX_B3_PORT;
        $extra
        $report
    }
    server { listen 127.0.0.1:\$TEST_NGINX_B1_PORT;
        location / {
            proxy_pass http://127.0.0.1:\$TEST_NGINX_HANG_PORT;
            proxy_read_timeout 150ms;
            error_page 504 =200 /answer;
        }
        location = /answer { return 200 "a"; }
        $a_metrics }
    server { listen 127.0.0.1:\$TEST_NGINX_B3_PORT;
        location / {
            proxy_pass http://127.0.0.1:\$TEST_NGINX_HANG_PORT;
            proxy_read_timeout 150ms;
            error_page 504 =200 /answer;
        }
        location = /answer { return 200 "c"; }
        $c_metrics }
    server { listen 127.0.0.1:\$TEST_NGINX_B2_PORT; location / { return 404; } }
    server { listen 127.0.0.1:\$TEST_NGINX_B4_PORT;
        location = /saturated { return 200 'spark_tasks{state="pending",} 3.0'; } }
_EOC_
}

our $Saturated = q{location = /kylin/api/prometheus { return 200 '# HELP spark_tasks Spark tasks
spark_tasks{state="pending",} 3.0
spark_tasks{state="running",} 4.0
spark_tasks_utilization 1.0'; }};
our $Calm = q{location = /kylin/api/prometheus { return 200 'spark_tasks{state="pending",} 0.0
spark_tasks_utilization 0.25'; }};
# Saturated once, then 503 (limit_req): the report turns stale.
our $Once = q{location = /kylin/api/prometheus { limit_req zone=once; proxy_pass http://127.0.0.1:$TEST_NGINX_B4_PORT/saturated; }};
our $Report = "kylin_load_report interval=100ms timeout=300ms;";

no_shuffle();
no_root_location();
run_tests();

__DATA__

=== TEST 1: kylin_load_report needs a zone
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:1;
        kylin_load_report;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin_load_report" requires "zone" in upstream "kylin_nodes" .* in \S+nginx\.conf:\d+/



=== TEST 2: an invalid condition names itself, the file and the line
--- http_config
    kylin_upstream kylin_nodes {
        zone kylin_nodes 64k;
        server 127.0.0.1:1;
        kylin_load_report 'busy=spark_tasks{state=pending}>0';
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid parameter "busy=spark_tasks\{state=pending\}>0": a condition is .* in "kylin_load_report" directive in \S+nginx\.conf:\d+/



=== TEST 3: stale shorter than interval
--- http_config
    kylin_upstream kylin_nodes {
        zone kylin_nodes 64k;
        server 127.0.0.1:1;
        kylin_load_report interval=2s stale=1s;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"stale" must be at least "interval" in "kylin_load_report" directive in \S+nginx\.conf:\d+/



=== TEST 4: twice in one block
--- http_config
    kylin_upstream kylin_nodes {
        zone kylin_nodes 64k;
        server 127.0.0.1:1;
        kylin_load_report;
        kylin_load_report interval=2s;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin_load_report" directive is duplicate in \S+nginx\.conf:\d+/



=== TEST 5: in an upstream without the kylin balancer
--- http_config
    upstream kylin_nodes {
        zone kylin_nodes 64k;
        server 127.0.0.1:1;
        kylin_load_report;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin_load_report" needs the kylin balancer: add "kylin;" to upstream "kylin_nodes"/



=== TEST 6: control: without reports the client stays at home (a) throughout
--- http_config eval: main::nodes("", $main::Saturated, $main::Calm)
--- config eval: main::client_requests(20, 300)
--- request
GET /t
--- response_body_like eval
qr/\A\na{20}\n\z/
--- timeout: 20



=== TEST 7: a home that reports saturation: a new client goes to the calm node at once, and stays
Placement has seen nothing of the client, so it is placed for its first login's prior: its
first request already goes to c (two may reach a if the first report comes late), and the
rest follow it there (a client had to be known for a second before, 3 to 12 requests to a).
--- http_config eval: main::nodes($main::Report, $main::Saturated, $main::Calm)
--- config eval: main::client_requests(20, 300)
--- request
GET /t
--- response_body_like eval
qr/\A\na{0,2}c{18,}\n\z/
--- no_error_log
[alert]
[crit]
--- timeout: 20



=== TEST 8: a report that turned stale changes nothing
a reports saturation once, then answers 503: after `stale` (300 ms) its report is ignored.
--- http_config eval: main::nodes("kylin_load_report interval=100ms timeout=300ms stale=300ms;", $main::Once, $main::Calm)
--- config eval: main::client_requests(20, 600)
--- request
GET /t
--- response_body_like eval
qr/\A\na{20}\n\z/
--- timeout: 20



=== TEST 9: a node whose metrics page lacks the metric (missing report) changes nothing
--- http_config eval: main::nodes($main::Report, q{location = /kylin/api/prometheus { return 200 'jvm_threads_live_threads 7'; }}, $main::Calm)
--- config eval: main::client_requests(20, 300)
--- request
GET /t
--- response_body_like eval
qr/\A\na{20}\n\z/
--- timeout: 20



=== TEST 10: the status page: value, age, state and use of each server's report
a saturated, c calm, b (404) and a dead address missing with their reasons.
--- http_config eval: main::nodes("kylin_load_report interval=100ms timeout=300ms 'busy=spark_tasks{state=\"pending\"}>0' busy=spark_tasks_utilization>=0.9;", $main::Saturated, $main::Calm, "server 127.0.0.1:\$TEST_NGINX_B2_PORT; server 127.0.0.1:\$TEST_NGINX_DEAD_PORT max_fails=0;")
--- config eval: main::client_requests(1, 500, q{<!--# include virtual="/status" wait="yes" -->})
--- request
GET /t
--- response_body_like eval
qr/\A(?x)
    (?=.*"servers":\[
        \{"address":"127\.0\.0\.1:\d+",[^{}]*"load_report":\{"age":[\d.]+,"conditions":\[\{"busy":"spark_tasks\{state=\\"pending\\"\}>0","holds":true,"value":3\.0\},\{"busy":"spark_tasks_utilization>=0\.9","holds":true,"value":1\.0\}\],"failures":0,"fetches":[1-9]\d*,"last_failure":null,"last_failure_reason":null,"last_report":[\d.]+,"state":"saturated","used":true\},
        [^{}]*\},
        \{[^{}]*"load_report":\{"age":[\d.]+,"conditions":\[[^\]]*"holds":false,"value":0\.0\},[^\]]*"holds":false,"value":0\.25\}\],[^{}]*"state":"fresh","used":true\},[^{}]*\},
        \{[^{}]*"load_report":\{"age":null,"conditions":\[[^\]]*"value":null\},[^\]]*"value":null\}\],"failures":[1-9]\d*,[^{}]*"last_failure_reason":"status","last_report":null,"state":"missing","used":false\},[^{}]*\},
        \{[^{}]*"load_report":\{[^{}]*"conditions":\[[^\]]*\],[^{}]*"last_failure_reason":"connect",[^{}]*"state":"missing","used":false\},[^{}]*\}\])
/s
--- timeout: 20



=== TEST 11: Prometheus: the report's state, value, age and use
The client's one request goes to c (test 7), which does not matter here.
--- http_config eval: main::nodes($main::Report, $main::Saturated, $main::Calm)
--- config eval: main::client_requests(1, 500, q{<!--# include virtual="/status?format=prometheus" wait="yes" -->})
--- request
GET /t
--- response_body_like eval
qr/\A\n[ac]\n(?s)
    (?=.*^kylin_server_load_report\{upstream="kylin_nodes",server="127\.0\.0\.1:$ENV{TEST_NGINX_B1_PORT}",state="saturated"\}\ 1$)
    (?=.*^kylin_server_load_report\{upstream="kylin_nodes",server="127\.0\.0\.1:$ENV{TEST_NGINX_B3_PORT}",state="fresh"\}\ 1$)
    (?=.*^kylin_server_load_report_value\{upstream="kylin_nodes",server="127\.0\.0\.1:$ENV{TEST_NGINX_B1_PORT}",busy="spark_tasks\{state=\\"pending\\"\}>0"\}\ 3$)
    (?=.*^kylin_server_load_report_age_seconds\{upstream="kylin_nodes",server="127\.0\.0\.1:$ENV{TEST_NGINX_B1_PORT}"\}\ [\d.]+$)
    (?=.*^kylin_server_load_report_used\{upstream="kylin_nodes",server="127\.0\.0\.1:$ENV{TEST_NGINX_B1_PORT}"\}\ 1$)
    (?=.*^kylin_server_load_report_fetches_total\{upstream="kylin_nodes",server="127\.0\.0\.1:$ENV{TEST_NGINX_B1_PORT}"\}\ [1-9]\d*$)
/xm
--- timeout: 20



=== TEST 12: with kylin_balance requests the report is shown, not used
--- http_config eval: main::nodes($main::Report . " kylin_balance requests;", $main::Saturated, $main::Calm)
--- config eval: main::client_requests(1, 500, q{<!--# include virtual="/status" wait="yes" -->})
--- request
GET /t
--- response_body_like eval
qr/\A\na\n\{.*"load_report":\{[^{}]*"conditions":\[[^\]]*\],[^{}]*"state":"saturated","used":false\}/s
--- timeout: 20



=== TEST 13: a large metrics page (about 520 KB) is read whole: the metric at its end counts
--- user_files eval
">>> metrics\n" . ("jvm_gc_pause_seconds_count{action=\"end of minor GC\",} 1.0\n" x 9000) . "spark_tasks{state=\"pending\",} 2.0\n"
--- http_config
    kylin_upstream kylin_nodes {
        zone kylin_nodes 64k;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        kylin_load_report interval=200ms timeout=1s;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT;
        location = /kylin/api/prometheus { default_type text/plain; alias html/metrics; } }
--- config
    location = /t {
        proxy_pass http://127.0.0.1:$TEST_NGINX_HANG_PORT;
        proxy_read_timeout 700ms;
        error_page 504 = /status;
    }
    location = /status { kylin_status; }
--- request
GET /t
--- response_body_like eval
qr/"load_report":\{[^{}]*"conditions":\[[^\]]*"holds":true,"value":2\.0\}\],"failures":0,[^{}]*"state":"saturated","used":true\}/
--- timeout: 20



=== TEST 14: a page over 1 MiB is no report (invalid response)
--- user_files eval
">>> metrics\n" . ("jvm_gc_pause_seconds_count{action=\"end of minor GC\",} 1.0\n" x 20000) . "spark_tasks{state=\"pending\",} 2.0\n"
--- http_config
    kylin_upstream kylin_nodes {
        zone kylin_nodes 64k;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        kylin_load_report interval=200ms timeout=1s;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT;
        location = /kylin/api/prometheus { default_type text/plain; alias html/metrics; } }
--- config
    location = /t {
        proxy_pass http://127.0.0.1:$TEST_NGINX_HANG_PORT;
        proxy_read_timeout 700ms;
        error_page 504 = /status;
    }
    location = /status { kylin_status; }
--- request
GET /t
--- response_body_like eval
qr/"load_report":\{"age":null,[^{}]*"conditions":\[[^\]]*\],"failures":[1-9]\d*,[^{}]*"last_failure_reason":"invalid response",[^{}]*"state":"missing","used":false\}/
--- timeout: 20



=== TEST 15: with kylin_health_check beside it: both probe, each on its own schedule
--- http_config eval: main::nodes("kylin_load_report interval=100ms timeout=300ms; kylin_health_check interval=100ms timeout=300ms; ", $main::Saturated . q{ location = /kylin/api/health { return 200 '{"status":"UP"}'; }}, $main::Calm . q{ location = /kylin/api/health { return 503; }})
--- config eval: main::client_requests(1, 500, q{<!--# include virtual="/status" wait="yes" -->})
--- request
GET /t
--- response_body_like eval
qr/\A\na\n\{(?x)
    (?=.*"servers":\[
        \{[^{}]*"health":\{[^{}]*"state":"healthy"\},[^{}]*"load_report":\{[^{}]*"conditions":\[[^\]]*\],[^{}]*"state":"saturated","used":true\},[^{}]*\},
        \{[^{}]*"health":\{[^{}]*"state":"unhealthy"\},[^{}]*"load_report":\{[^{}]*"conditions":\[[^\]]*\],[^{}]*"state":"fresh","used":true\},[^{}]*"state":"unhealthy",)
/s
--- no_error_log
[alert]
[crit]
--- timeout: 20
