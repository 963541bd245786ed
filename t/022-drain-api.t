# kylin_status write=on: draining a server at run time with POST/PATCH of a small JSON
# document. A drained server takes no new clients or sessions; the sessions it holds stay;
# undraining brings it back. Bad documents are refused with 400/404/413, and without
# write=on the location stays read-only.
use Test::Nginx::Socket 'no_plan';

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
}

use FindBin;
require "$FindBin::Bin/ssi.pl";

# Twenty requests with stickiness keys k=1..20 (the main request's headers, a session
# cookie too, go along).
sub twenty {
    return main::ssi_page(CORE::join "", map { qq{<!--# include virtual="/q?k=$_" wait="yes" -->} } 1 .. 20)
        . "    location = /q { proxy_pass http://kylin_nodes; }\n"
        . "    location = /login { proxy_pass http://kylin_nodes; }\n";
}

sub nodes {
    return <<'_EOC_';
    kylin_upstream kylin_nodes {
        zone kylin_nodes 64k;
        kylin_hash $arg_k;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { return 200 "a"; } }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT;
        location = /login { add_header Set-Cookie "JSESSIONID=DRA1NSESS10N; Path=/"; return 200 "b"; }
        location / { return 200 "b"; } }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; location / { return 200 "c"; } }
_EOC_
}

sub drain {
    my ($port, $on) = @_;
    my $v = $on ? "true" : "false";
    return qq{POST /status\n{"upstream": "kylin_nodes", "server": "127.0.0.1:$port", "drain": $v}};
}

no_shuffle();
no_root_location();
run_tests();

__DATA__

=== TEST 1: an invalid parameter of kylin_status
--- http_config
--- config
    location = /status { kylin_status write=yes; }
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid parameter "write=yes" in "kylin_status" directive: it must be "write=on" or "write=off" in \S+nginx\.conf:\d+/



=== TEST 2: without write=on the status location refuses POST and PATCH
--- http_config eval: main::nodes()
--- config
    location = /status { kylin_status; }
    location = /status-off { kylin_status write=off; }
--- request eval
[main::drain($ENV{TEST_NGINX_B2_PORT}, 1), "PATCH /status-off\n{}", "GET /status-off"]
--- error_code eval
[405, 405, 200]



=== TEST 3: a drained server takes no new requests; undrained, it takes them again
--- http_config eval: main::nodes()
--- config eval
"    location = /status { kylin_status write=on; }\n" . main::twenty()
--- request eval
[
    main::drain($ENV{TEST_NGINX_B2_PORT}, 0),
    "GET /t",
    main::drain($ENV{TEST_NGINX_B2_PORT}, 1),
    "GET /t",
    "GET /status",
    main::drain($ENV{TEST_NGINX_B2_PORT}, 0),
    "GET /t",
]
--- response_body_like eval
[
    qr/\A\{"servers":\[\{"address":"127\.0\.0\.1:\d+","draining":false,"sessions":0\}\],"upstream":"kylin_nodes"\}\n\z/,
    qr/\A(?=[^\n]*a)(?=[^\n]*b)(?=[^\n]*c)[abc]{20}\n\z/,
    qr/\A\{"servers":\[\{"address":"127\.0\.0\.1:$ENV{TEST_NGINX_B2_PORT}","draining":true,"sessions":0\}\],"upstream":"kylin_nodes"\}\n\z/,
    qr/\A(?=[^\n]*a)(?=[^\n]*c)[ac]{20}\n\z/,
    qr/"address":"127\.0\.0\.1:$ENV{TEST_NGINX_B2_PORT}",[^{}]*"state":"draining"/,
    qr/"draining":false/,
    qr/\A(?=[^\n]*a)(?=[^\n]*b)(?=[^\n]*c)[abc]{20}\n\z/,
]
--- no_error_log
[alert]
[crit]



=== TEST 4: a drained server keeps the sessions that live there; the status page counts them
Every server but b is drained while the session logs in (so it lands on b), then b is drained
and the others are not: the session's requests stay on b, session-less ones avoid it.
--- http_config eval: main::nodes()
--- config eval
"    location = /status { kylin_status write=on; }\n" . main::twenty()
--- request eval
[
    main::drain($ENV{TEST_NGINX_B1_PORT}, 1),
    main::drain($ENV{TEST_NGINX_B3_PORT}, 1),
    main::drain($ENV{TEST_NGINX_B2_PORT}, 0),
    "GET /login?k=7",
    main::drain($ENV{TEST_NGINX_B1_PORT}, 0),
    main::drain($ENV{TEST_NGINX_B3_PORT}, 0),
    "PATCH /status\n" . qq{{"upstream":"kylin_nodes","server":"127.0.0.1:$ENV{TEST_NGINX_B2_PORT}","drain":true}},
    "GET /t",
    "GET /t",
    "GET /status",
]
--- more_headers eval
["", "", "", "", "", "", "", "Cookie: JSESSIONID=DRA1NSESS10N", "", ""]
--- response_body_like eval
[
    qr/"draining":true/,
    qr/"draining":true/,
    qr/"draining":false/,
    qr/\Ab\z/,
    qr/"draining":false/,
    qr/"draining":false/,
    qr/\A\{"servers":\[\{"address":"127\.0\.0\.1:$ENV{TEST_NGINX_B2_PORT}","draining":true,"sessions":1\}\],"upstream":"kylin_nodes"\}\n\z/,
    qr/\Ab{20}\n\z/,
    qr/\A(?=[^\n]*a)(?=[^\n]*c)[ac]{20}\n\z/,
    qr/"address":"127\.0\.0\.1:$ENV{TEST_NGINX_B2_PORT}",[^{}]*"sessions":1,[^{}]*"state":"draining"/,
]



=== TEST 5: bad documents, unknown upstreams and servers; GET still serves the status
--- http_config eval: main::nodes()
--- config
    location = /status { client_body_buffer_size 64k; kylin_status write=on; }
--- request eval
[
    "POST /status\n{\"upstream\":\"kylin_nodes\",\"server\":\"x\"}",
    "POST /status\nnot json",
    "POST /status\n{\"upstream\":\"elsewhere\",\"server\":\"127.0.0.1:1\",\"drain\":true}",
    "POST /status\n{\"upstream\":\"kylin_nodes\",\"server\":\"127.0.0.1:1\",\"drain\":true}",
    "POST /status\n{\"upstream\":\"kylin_nodes\",\"server\":\"" . ("x" x 5000) . "\",\"drain\":true}",
    "DELETE /status",
    "GET /status",
]
--- error_code eval
[400, 400, 404, 404, 413, 405, 200]
--- response_body_like eval
[
    qr/\A\{"error":"\\"drain\\" is missing"\}\n\z/,
    qr/\A\{"error":"invalid JSON: /,
    qr/\A\{"error":"no kylin upstream \\"elsewhere\\""\}\n\z/,
    qr/\A\{"error":"no server \\"127\.0\.0\.1:1\\" in upstream \\"kylin_nodes\\""\}\n\z/,
    qr/\A\{"error":"the document is larger than 4096 bytes"\}\n\z/,
    qr/405 Not Allowed/,
    qr/\A\{.*"upstreams":\{"kylin_nodes":/,
]



=== TEST 6: a drain is logged
--- http_config eval: main::nodes()
--- config
    location = /status { kylin_status write=on; }
--- request eval
main::drain($ENV{TEST_NGINX_B3_PORT}, 1)
--- error_code: 200
--- error_log eval
qr/\[notice\] .*kylin: upstream "kylin_nodes": 127\.0\.0\.1:$ENV{TEST_NGINX_B3_PORT} draining through the status API/



=== TEST 7: a drain command followed by another in the same packet gets its answer's body
The second request in the buffer makes nginx mark the first as pipelined; on nginx 1.30 and
1.31 the bindings' header_only bit is that pipeline bit, so reading it lost the first answer's
body there. (The second answer follows; the runner reads the first.)
--- http_config eval: main::nodes()
--- config
    location = /status { kylin_status write=on; }
--- raw_request eval
my $d = qq{{"upstream": "kylin_nodes", "server": "127.0.0.1:$ENV{TEST_NGINX_B2_PORT}", "drain": true}};
my $u = qq{{"upstream": "kylin_nodes", "server": "127.0.0.1:$ENV{TEST_NGINX_B2_PORT}", "drain": false}};
"POST /status HTTP/1.1\r\nHost: localhost\r\nContent-Length: " . length($d) . "\r\n\r\n$d"
. "POST /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: " . length($u) . "\r\n\r\n$u"
--- response_body_like eval
qr/\A\{"servers":\[\{"address":"127\.0\.0\.1:\d+","draining":true,"sessions":0\}\],"upstream":"kylin_nodes"\}\n/
--- no_error_log
[alert]
