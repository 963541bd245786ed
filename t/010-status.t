# kylin_status after known traffic: the JSON fields and the Prometheus text.
use Test::Nginx::Socket 'no_plan';

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
    $ENV{TEST_NGINX_REALIP_PORT} ||= $base + 20;
    $ENV{TEST_NGINX_DEAD_PORT} ||= $base + 29;
}

use FindBin;
require "$FindBin::Bin/ssi.pl";

# Known traffic: one login from 10.9.9.9 (sets the session), three requests of that session
# from other addresses, then four session-less requests from 10.5.5.5; then the status.
sub traffic_then {
    my ($status_uri) = @_;
    return main::ssi_page(
        q{<!--# include virtual="/via/10.9.9.9" wait="yes" -->},
        CORE::join("", map { qq{<!--# include virtual="/via/10.66.$_.1/s/ST4TUS1D" wait="yes" -->} } 1 .. 3),
        CORE::join("", (q{<!--# include virtual="/via/10.5.5.5" wait="yes" -->}) x 4),
        qq{<!--# include virtual="$status_uri" wait="yes" -->},
    ) . main::via_location() . <<'_EOC_';
    location /status-via {
        proxy_pass http://127.0.0.1:$TEST_NGINX_REALIP_PORT/status;
    }
_EOC_
}

sub http_config {
    return main::client_server() . <<'_EOC_';
    map $cookie_JSESSIONID $login_cookie { "" "JSESSIONID=ST4TUS1D; Path=/"; default ""; }
    kylin_upstream kylin_nodes {
        kylin_balance_factor 1.5;
        server 127.0.0.1:$TEST_NGINX_B1_PORT weight=2;
        server 127.0.0.1:$TEST_NGINX_B2_PORT down;
        server 127.0.0.1:$TEST_NGINX_DEAD_PORT backup;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { add_header Set-Cookie $login_cookie; return 200 "n1"; } }
_EOC_
}

no_shuffle();
run_tests();

__DATA__

=== TEST 1: JSON: servers, states, decisions, routes, nothing in flight
Which clients hash to the down server (and fail over) depends on the test's ports; the
decisions add up the same either way.
--- http_config eval: main::http_config()
--- config eval: main::traffic_then("/status-via")
--- request
GET /t
--- response_body_like eval
qr/\An1\nn1n1n1\nn1n1n1n1\n\{(?x)
    (?=.*"version":1)
    (?=.*"load_zone":\{"capacity":\d+,"claims_failed":0,"generation":\d+,"reclaimed":\d+,"slots_used":\d+,"zone":"kylin_load"\})
    (?=.*"kylin_nodes":\{"balance":"requests","balance_factor":1\.5,"bound_per_weight":\d+,"decisions":\{"backup":0,"failover":(?:0,"learned":3,"moved":0,"spilled":0,"sticky":5|1,"learned":3,"moved":0,"spilled":0,"sticky":4|4,"learned":3,"moved":0,"spilled":0,"sticky":1|5,"learned":3,"moved":0,"spilled":0,"sticky":0)\},"in_flight":0,"live_weight":2,"moved_clients":null,)
    (?=.*"servers":\[\{"address":"127\.0\.0\.1:\d+","backup":false,"backup_requests":0,"clients_moved_in":null,"failover":[0145],"failures":0,"health":null,"in_flight":0,"learned":3,"load_report":null,"load_slot":true,"moved":0,"requests":8,"server":"127\.0\.0\.1:\d+","sessions":1,"slow_start":null,"spilled_in":0,"spilled_out":0,"state":"up","sticky":[0145],"weight":2\},
        \{"address":"127\.0\.0\.1:\d+","backup":false,[^}]*"requests":0,[^}]*"state":"down","sticky":0,"weight":1\},
        \{"address":"127\.0\.0\.1:\d+","backup":true,[^}]*"requests":0,[^}]*"state":"up",[^}]*\}\])
    (?=.*"session_cookie":"JSESSIONID")
    (?=.*"session_routes":\{"capacity":\d+,"entries":1,"evictions":0,"expired":0,"hits":3,"inserts":1,"misses":\d+,"timeout_seconds":28800,"zone":"kylin_session_routes"\})
    (?=.*"session_store":null)
/s
--- no_error_log
[error]



=== TEST 2: Prometheus text (?format=prometheus), same traffic
--- http_config eval: main::http_config()
--- config eval: main::traffic_then("/status-via?format=prometheus")
--- request
GET /t
--- response_body_like eval
qr/\An1\nn1n1n1\nn1n1n1n1\n(?x)
    (?=.*^\#\ TYPE\ kylin_server_requests_total\ counter$)
    (?=.*^kylin_server_requests_total\{upstream="kylin_nodes",server="127\.0\.0\.1:\d+"\}\ 8$)
    (?=.*^kylin_server_decisions_total\{upstream="kylin_nodes",server="127\.0\.0\.1:\d+",route="learned"\}\ 3$)
    (?=.*^kylin_server_decisions_total\{upstream="kylin_nodes",server="127\.0\.0\.1:\d+",route="sticky"\}\ [0145]$)
    (?=.*^kylin_server_state\{upstream="kylin_nodes",server="127\.0\.0\.1:\d+",state="down"\}\ 1$)
    (?=.*^kylin_server_backup\{upstream="kylin_nodes",server="127\.0\.0\.1:\d+"\}\ 1$)
    (?=.*^kylin_server_weight\{upstream="kylin_nodes",server="127\.0\.0\.1:\d+"\}\ 2$)
    (?=.*^kylin_upstream_balance_factor\{upstream="kylin_nodes"\}\ 1\.5$)
    (?=.*^kylin_upstream_in_flight_requests\{upstream="kylin_nodes"\}\ 0$)
    (?=.*^kylin_server_load_slot\{upstream="kylin_nodes",server="127\.0\.0\.1:\d+"\}\ 1$)
    (?=.*^kylin_load_zone_slots_used\{zone="kylin_load"\}\ [1-9]\d*$)
    (?=.*^kylin_load_zone_claims_failed_total\{zone="kylin_load"\}\ 0$)
    (?=.*^kylin_session_routes_inserts_total\{upstream="kylin_nodes",zone="kylin_session_routes"\}\ 1$)
    (?!.*^kylin_session_store_)
/sm
--- no_error_log
[error]



=== TEST 3: only GET and HEAD
--- http_config eval: main::http_config()
--- config
    location = /st { kylin_status; }
--- request
POST /st
--- error_code: 405



=== TEST 4: kylin_status takes only write=on|off
--- http_config
--- config
    location = /st { kylin_status json; }
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid parameter "json" in "kylin_status" directive/



=== TEST 5: store credentials never show: status page and error log
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_store redis://kylin:hunter2@127.0.0.1:$TEST_NGINX_DEAD_PORT format=tomcat timeout=200ms fail_threshold=1;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; return 200 "n1\n"; }
--- config eval
main::ssi_page(
    q{<!--# include virtual="/q" wait="yes" -->},
    q{<!--# include virtual="/st" wait="yes" -->},
) . <<'_EOC_';
    location = /q { proxy_pass http://kylin_nodes; }
    location = /st { kylin_status; }
_EOC_
--- request
GET /t
--- more_headers
Cookie: JSESSIONID=5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE01
--- response_body_like eval
qr/\An1\n\n\{(?=.*"urls":\["redis:\/\/\*\*\*\@127\.0\.0\.1:\d+"\])(?!.*hunter2)(?=.*"breaker":"open")/s
--- error_log
failed 1 times in a row
--- no_error_log eval
qr/hunter2/
