# kylin_status's formats: the HTML dashboard for browsers (Accept or ?format=html), JSON and
# Prometheus text as before; the page's headers, HEAD, conditional requests, no external URL.
use Test::Nginx::Socket 'no_plan';

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{TEST_NGINX_B1_PORT} ||= $base + 11;
}

our $Browser = 'text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7';

add_block_preprocessor(sub {
    my $block = shift;
    $block->set_value("http_config", <<'_EOC_') unless defined $block->http_config;
    kylin_upstream kylin_nodes {
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
_EOC_
    $block->set_value("config", "    location = /st { kylin_status; }\n") unless defined $block->config;
    $block->set_value("no_error_log", "[error]\n") unless defined $block->no_error_log;
});

no_shuffle();
run_tests();

__DATA__

=== TEST 1: a browser's Accept gets the dashboard, with its headers
--- request
GET /st
--- more_headers eval
"Accept: $::Browser"
--- response_headers
Content-Type: text/html; charset=utf-8
Cache-Control: no-cache
Vary: Accept
X-Content-Type-Options: nosniff
Referrer-Policy: no-referrer
Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'
--- raw_response_headers_like eval
qr/\r\nETag: "kylin-[0-9a-f]{16}"\r\n/
--- response_body_like eval
qr/\A<!DOCTYPE html>.*<title>Kylin upstreams<\/title>.*\?format=json.*<\/html>\n\z/s



=== TEST 2: the page loads nothing from anywhere else
--- request
GET /st?format=html
--- response_body_unlike eval
qr/https?:|\bsrc\s*=|<link|<iframe|\@import|url\(|\/\/[a-z0-9-]+\.[a-z]{2,}\//i



=== TEST 3: curl's Accept (*/*) keeps getting JSON, as before the dashboard
--- request
GET /st
--- more_headers
Accept: */*
--- response_headers
Content-Type: application/json
Vary: Accept
!ETag
!Content-Security-Policy
--- response_body_like eval
qr/\A\{"load_zone":\{.*"upstreams":\{"kylin_nodes":\{.*"version":1\}\n\z/s



=== TEST 4: no Accept header: JSON
--- request
GET /st
--- response_headers
Content-Type: application/json
--- response_body_like eval
qr/\A\{"load_zone":/



=== TEST 5: a JSON client's Accept: JSON
--- request
GET /st
--- more_headers
Accept: application/json, text/html;q=0.9
--- response_headers
Content-Type: application/json



=== TEST 6: ?format=html wins over Accept: */*
--- request
GET /st?format=html
--- more_headers
Accept: */*
--- response_headers
Content-Type: text/html; charset=utf-8
--- response_body_like eval
qr/\A<!DOCTYPE html>/



=== TEST 7: ?format=json wins over a browser's Accept
--- request
GET /st?format=json
--- more_headers eval
"Accept: $::Browser"
--- response_headers
Content-Type: application/json
--- response_body_like eval
qr/\A\{"load_zone":/



=== TEST 8: ?format=prometheus wins over a browser's Accept
--- request
GET /st?format=prometheus
--- more_headers eval
"Accept: $::Browser"
--- response_headers
Content-Type: text/plain; version=0.0.4; charset=utf-8
--- response_body_like eval
qr/^kylin_server_requests_total\{upstream="kylin_nodes",server="127\.0\.0\.1:\d+"\} 0$/m



=== TEST 9: HEAD of the page: its headers, no body
--- request
HEAD /st
--- more_headers eval
"Accept: $::Browser"
--- response_headers
Content-Type: text/html; charset=utf-8
Cache-Control: no-cache
--- raw_response_headers_like eval
qr/\r\nContent-Length: [1-9]\d{3,}\r\n/
--- response_body chomp



=== TEST 10: a browser revalidating the page gets 304 (If-None-Match)
--- request
GET /st
--- more_headers eval
"Accept: $::Browser\nIf-None-Match: *"
--- error_code: 304
--- response_body chomp



=== TEST 11: another entity tag gets the page
--- request
GET /st
--- more_headers eval
"Accept: $::Browser\nIf-None-Match: \"kylin-0000000000000000\""
--- error_code: 200
--- response_body_like eval
qr/\A<!DOCTYPE html>/



=== TEST 12: only GET and HEAD, for the page too
--- request
POST /st?format=html
--- error_code: 405



=== TEST 13: HEAD of the JSON: its headers, no body
--- request
HEAD /st
--- response_headers
Content-Type: application/json
Vary: Accept
!ETag
--- raw_response_headers_like eval
qr/\r\nContent-Length: [1-9]\d+\r\n/
--- response_body chomp



=== TEST 14: HEAD of the Prometheus text
--- request
HEAD /st?format=prometheus
--- response_headers
Content-Type: text/plain; version=0.0.4; charset=utf-8
--- response_body chomp



=== TEST 15: an unknown format is JSON, as before the dashboard
--- request
GET /st?format=yaml
--- more_headers eval
"Accept: $::Browser"
--- response_headers
Content-Type: application/json
--- response_body_like eval
qr/\A\{"load_zone":/



=== TEST 16: pipelined requests each get their body
The body is left out for HEAD and 304 only: on nginx 1.30+ the bindings' header_only bit is
the request's pipeline bit, which nginx sets on a request followed by another in its buffer.
--- pipelined_requests eval
["GET /st?format=html", "GET /st?format=json"]
--- error_code eval
[200, 200]
--- response_body_like eval
[qr/\A<!DOCTYPE html>.*<\/html>\n\z/s, qr/\A\{"load_zone":.*\}\n\z/s]
