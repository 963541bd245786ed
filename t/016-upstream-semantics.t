# nginx's upstream semantics under the kylin balancer (`kylin;` in a stock upstream block):
# down and backup servers, max_fails / fail_timeout, retries (every server at most once),
# failover from a learned session route, max_conns shared by two workers through `zone`, and
# a `resolve` server whose name has no address (yet).
# Ported from probes written beside a run of nginx's own test suite (nginx-tests) against the
# balancer; checks the other .t files already make are left to them.
#
# `kylin_hash $arg_k` makes the query argument k the stickiness key, so one test request can
# speak for many keys (t/ssi.pl's ssi_page), and X-UA ($upstream_addr) shows every server a
# request tried, in order. Which key hashes to which server depends on the ports, so no
# expectation names the server of a given key: they say "each at most once", "never this
# one", "both of these", and so on.
use Test::Nginx::Socket 'no_plan';

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
    # The server the max_conns test's concurrent requests go through (reuseport: two workers).
    $ENV{TEST_NGINX_FRONT_PORT} ||= $base + 20;
    # Ports nothing listens on: connections to them are refused.
    $ENV{"TEST_NGINX_D${_}_PORT"} ||= $base + 24 + $_ for 1 .. 4;
    # A DNS server that never answers (nothing listens on this UDP port).
    $ENV{TEST_NGINX_DNS_PORT} ||= $base + 29;
    # 120 bytes of padding: at 100 bytes/s each answer takes a second or two.
    $ENV{TEST_NGINX_PAD} = "." x 120;
}

use FindBin;
require "$FindBin::Bin/ssi.pl";

# A regex for one $upstream_addr entry: server NAME (B1 .. B4, D1 .. D4) or any of NAMES.
sub addr {
    my $ports = CORE::join "|", map { $ENV{"TEST_NGINX_${_}_PORT"} } @_;
    return "127\\.0\\.0\\.1:(?:$ports)";
}

# A regex for $upstream_addr listing N servers, each one of NAMES, no server twice.
sub distinct {
    my ($n, @names) = @_;
    my $set = CORE::join "|", map { $ENV{"TEST_NGINX_${_}_PORT"} } @names;
    return CORE::join ", ", map {
        my $i = $_;
        "127\\.0\\.0\\.1:" . CORE::join("", map { "(?!\\$_\\b)" } 1 .. $i - 1) . "($set)"
    } 1 .. $n;
}

# SSI includes of LOC?k=KEY for each key, one after the other.
sub keys_of {
    my ($loc, @keys) = @_;
    return CORE::join "", map { qq{<!--# include virtual="$loc?k=$_" wait="yes" -->} } @keys;
}

# A regex for one line of the max_conns test: twelve answers, "busy " for a 502, else the
# node's padded answer; $count{n1} etc. say exactly how many each node gave.
sub conns_line {
    my (%count) = @_;
    my $re = '(?=(?:busy |\.+ n[123] ){12}\n)';
    for my $n (qw(n1 n2 n3)) {
        my $c = $count{$n} || 0;
        my $other = "(?:(?! $n )[^\\n])*";
        $re .= "(?=(?:$other $n ){$c}$other\\n)";
    }
    return $re . '[^\n]*\n';
}

# One block runs under a master with two workers (its name says "two workers"), the others in
# a single process, where nginx's failure state (without `zone`) is the one the next request
# sees.
add_block_preprocessor(sub {
    my $block = shift;
    if ($block->name =~ /two workers/) {
        master_on();
        workers(2);
    } else {
        master_off();
        workers(1);
    }
});

no_shuffle();
no_root_location();
run_tests();

__DATA__

=== TEST 1: a down server never gets a request, with and without zone
Sixty keys through each upstream: none reaches n2, and the others share its keys.
--- http_config
    upstream u_down {
        kylin;
        kylin_hash $arg_k;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT down;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
    upstream u_down_z {
        kylin;
        kylin_hash $arg_k;
        zone u_down_z 64k;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT down;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; return 200 "n1"; }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; return 200 "n2"; }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; return 200 "n3"; }
--- config eval
main::ssi_page(main::keys_of("/d/", 1 .. 60), main::keys_of("/dz/", 1 .. 60)) . <<'_EOC_';
    location /d/ { proxy_pass http://u_down/; }
    location /dz/ { proxy_pass http://u_down_z/; }
_EOC_
--- request
GET /t
--- response_body_like eval
qr/\A(?:(?=[^\n]*n1)(?=[^\n]*n3)(?:n[13]){60}\n){2}\z/
--- no_error_log
[error]



=== TEST 2: backup servers get nothing while the primaries are usable, with and without zone
--- http_config
    upstream u_bk {
        kylin;
        kylin_hash $arg_k;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT backup;
    }
    upstream u_bk_z {
        kylin;
        kylin_hash $arg_k;
        zone u_bk_z 64k;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT backup;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; return 200 "n1"; }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; return 200 "n2"; }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; return 200 "n3"; }
--- config eval
main::ssi_page(main::keys_of("/b/", 1 .. 60), main::keys_of("/bz/", 1 .. 60)) . <<'_EOC_';
    location /b/ { proxy_pass http://u_bk/; }
    location /bz/ { proxy_pass http://u_bk_z/; }
_EOC_
--- request
GET /t
--- response_body_like eval
qr/\A(?:(?=[^\n]*n1)(?=[^\n]*n2)(?:n[12]){60}\n){2}\z/
--- no_error_log
[error]



=== TEST 3: dead primaries are each tried once, then the backup; then the backup directly
After the first request both primaries have failed max_fails=1 times: within fail_timeout the
next requests (any key) go straight to the backup, without a connect attempt.
--- http_config
    upstream u_bkdead {
        kylin;
        kylin_hash $arg_k;
        server 127.0.0.1:$TEST_NGINX_D1_PORT max_fails=1 fail_timeout=30s;
        server 127.0.0.1:$TEST_NGINX_D2_PORT max_fails=1 fail_timeout=30s;
        server 127.0.0.1:$TEST_NGINX_B3_PORT backup;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; return 200 "n3"; }
--- config
    location / {
        proxy_pass http://u_bkdead;
        add_header X-UA $upstream_addr always;
    }
--- request eval
["GET /?k=1", "GET /?k=2", "GET /?k=3"]
--- response_body eval
["n3", "n3", "n3"]
--- response_headers_like eval
[
    "X-UA: " . main::distinct(2, qw(D1 D2)) . ", " . main::addr("B3"),
    "X-UA: " . main::addr("B3"),
    "X-UA: " . main::addr("B3"),
]



=== TEST 4: max_fails and fail_timeout: skipped while failed, tried again after; max_fails=0
u_ft: D1 (max_fails=1, fail_timeout=1s) is skipped by the request after its failure and tried
again once fail_timeout has passed (the last request waits 2.2 s). u_mf2: D1 (max_fails=2)
is tried by two requests, skipped by the third. In both, D2 (max_fails=0) fails every time
and is still tried by every request.
--- http_config
    upstream u_ft {
        kylin;
        kylin_hash $arg_k;
        server 127.0.0.1:$TEST_NGINX_D1_PORT max_fails=1 fail_timeout=1s;
        server 127.0.0.1:$TEST_NGINX_D2_PORT max_fails=0;
        server 127.0.0.1:$TEST_NGINX_B1_PORT backup;
    }
    upstream u_mf2 {
        kylin;
        kylin_hash $arg_k;
        server 127.0.0.1:$TEST_NGINX_D1_PORT max_fails=2 fail_timeout=30s;
        server 127.0.0.1:$TEST_NGINX_D2_PORT max_fails=0;
        server 127.0.0.1:$TEST_NGINX_B1_PORT backup;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; return 200 "n1"; }
--- config
    add_header X-UA $upstream_addr always;
    location /ft/ { proxy_pass http://u_ft/; }
    location /mf2/ { proxy_pass http://u_mf2/; }
--- request eval
[
    "GET /ft/?k=1",
    "GET /ft/?k=1",
    "GET /mf2/?k=1",
    "GET /mf2/?k=1",
    "GET /mf2/?k=1",
    ["GET /ft/", { value => "?k=1", delay_before => 2.2 }],
]
--- response_body eval
["n1", "n1", "n1", "n1", "n1", "n1"]
--- response_headers_like eval
[
    "X-UA: " . main::distinct(2, qw(D1 D2)) . ", " . main::addr("B1"),
    "X-UA: " . main::addr("D2") . ", " . main::addr("B1"),
    "X-UA: " . main::distinct(2, qw(D1 D2)) . ", " . main::addr("B1"),
    "X-UA: " . main::distinct(2, qw(D1 D2)) . ", " . main::addr("B1"),
    "X-UA: " . main::addr("D2") . ", " . main::addr("B1"),
    "X-UA: " . main::distinct(2, qw(D1 D2)) . ", " . main::addr("B1"),
]
--- timeout: 10



=== TEST 5: the only server of an upstream is tried even after max_fails
As with round robin: a single server is never considered failed, so there is no "no live
upstreams" (whose $upstream_addr would be the upstream's name).
--- http_config
    upstream u_single {
        kylin;
        server 127.0.0.1:$TEST_NGINX_D1_PORT max_fails=1 fail_timeout=30s;
    }
--- config
    location / {
        proxy_pass http://u_single;
        add_header X-UA $upstream_addr always;
    }
--- request eval
["GET /", "GET /", "GET /"]
--- error_code eval
[502, 502, 502]
--- response_headers_like eval
[
    "X-UA: " . main::addr("D1"),
    "X-UA: " . main::addr("D1"),
    "X-UA: " . main::addr("D1"),
]
--- no_error_log
no live upstreams



=== TEST 6: retries: every dead server is tried exactly once; proxy_next_upstream_tries
--- http_config
    upstream u_dead4 {
        kylin;
        kylin_hash $arg_k;
        server 127.0.0.1:$TEST_NGINX_D1_PORT max_fails=0;
        server 127.0.0.1:$TEST_NGINX_D2_PORT max_fails=0;
        server 127.0.0.1:$TEST_NGINX_D3_PORT max_fails=0;
        server 127.0.0.1:$TEST_NGINX_D4_PORT max_fails=0;
    }
--- config
    add_header X-UA $upstream_addr always;
    location /all/ { proxy_pass http://u_dead4/; }
    location /two/ { proxy_pass http://u_dead4/; proxy_next_upstream_tries 2; }
--- request eval
["GET /all/?k=1", "GET /all/?k=2", "GET /two/?k=1", "GET /two/?k=3"]
--- error_code eval
[502, 502, 502, 502]
--- response_headers_like eval
[
    "X-UA: " . main::distinct(4, qw(D1 D2 D3 D4)),
    "X-UA: " . main::distinct(4, qw(D1 D2 D3 D4)),
    "X-UA: " . main::distinct(2, qw(D1 D2 D3 D4)),
    "X-UA: " . main::distinct(2, qw(D1 D2 D3 D4)),
]
--- no_error_log
no live upstreams



=== TEST 7: proxy_next_upstream http_500: each server is tried once, the last answer returned
--- http_config
    upstream u_500 {
        kylin;
        kylin_hash $arg_k;
        server 127.0.0.1:$TEST_NGINX_B1_PORT max_fails=0;
        server 127.0.0.1:$TEST_NGINX_B2_PORT max_fails=0;
        server 127.0.0.1:$TEST_NGINX_B3_PORT max_fails=0;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; return 500 "e1"; }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; return 500 "e2"; }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; return 500 "e3"; }
--- config
    location / {
        proxy_pass http://u_500;
        proxy_next_upstream http_500;
        add_header X-UA $upstream_addr always;
    }
--- request eval
["GET /?k=1", "GET /?k=2"]
--- error_code eval
[500, 500]
--- response_body_like eval
["^e[123]\$", "^e[123]\$"]
--- response_headers_like eval
[
    "X-UA: " . main::distinct(3, qw(B1 B2 B3)),
    "X-UA: " . main::distinct(3, qw(B1 B2 B3)),
]



=== TEST 8: a learned route is followed from any key; when its server fails, no repeats
Only n1 accepts the login (n2 and n3 answer 404, which nginx passes on without counting a
failure), so the session is learned on n1 whatever the login's key. Then: the session from
twenty keys goes to n1; n1 answers 502 to /fail: that request goes on to one other server,
trying none twice; n1 has now failed (max_fails=1), so the session's requests go to their
keys' next servers (both others get some), without trying n1 (and n2, n3 were not marked
failed by their 404s).
--- http_config
    upstream u_sess {
        kylin;
        kylin_hash $arg_k;
        server 127.0.0.1:$TEST_NGINX_B1_PORT max_fails=1 fail_timeout=30s;
        server 127.0.0.1:$TEST_NGINX_B2_PORT max_fails=1 fail_timeout=30s;
        server 127.0.0.1:$TEST_NGINX_B3_PORT max_fails=1 fail_timeout=30s;
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_B1_PORT;
        location / { return 200 "n1"; }
        location /login { add_header Set-Cookie "JSESSIONID=L0GIN1D; Path=/"; return 200 "n1"; }
        location /fail { return 502; }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_B2_PORT;
        location / { return 200 "n2"; }
        location /login { return 404; }
    }
    server {
        listen 127.0.0.1:$TEST_NGINX_B3_PORT;
        location / { return 200 "n3"; }
        location /login { return 404; }
    }
--- config eval
main::ssi_page(main::keys_of("/s/", 1 .. 20)) . <<'_EOC_';
    location /s/ {
        proxy_pass http://u_sess/;
        proxy_next_upstream error timeout http_404 http_502;
        add_header X-UA $upstream_addr always;
    }
_EOC_
--- request eval
["GET /s/login?k=1", "GET /t", "GET /s/fail?k=5", "GET /t", "GET /s/?k=7"]
--- more_headers eval
["", ("Cookie: JSESSIONID=L0GIN1D") x 4]
--- response_body_like eval
[
    qr/\An1\z/,
    qr/\A(?:n1){20}\n\z/,
    qr/\An[23]\z/,
    qr/\A(?=[^\n]*n2)(?=[^\n]*n3)(?:n[23]){20}\n\z/,
    qr/\An[23]\z/,
]
--- response_headers_like eval
[
    "X-UA: (?:" . main::addr(qw(B2 B3)) . ", ){0,2}" . main::addr("B1")
        . "\nSet-Cookie: JSESSIONID=L0GIN1D; Path=/",
    "",
    "X-UA: " . main::addr("B1") . ", " . main::addr(qw(B2 B3)),
    "",
    "X-UA: " . main::addr(qw(B2 B3)),
]



=== TEST 9: max_conns with zone holds across two workers
Twelve concurrent slow requests per upstream, through a front server whose reuseport sockets
spread them over both workers; a request that finds no server under max_conns gets 502,
shown as "busy". One server with max_conns=1: one answer. Two: one each. A primary with
max_conns=1 and a backup with max_conns=2: one from the primary, two from the backup.
--- http_config
    upstream u_mc1 {
        kylin;
        kylin_hash $arg_k;
        zone u_mc1 64k;
        server 127.0.0.1:$TEST_NGINX_B1_PORT max_conns=1;
    }
    upstream u_mc2 {
        kylin;
        kylin_hash $arg_k;
        zone u_mc2 64k;
        server 127.0.0.1:$TEST_NGINX_B1_PORT max_conns=1;
        server 127.0.0.1:$TEST_NGINX_B2_PORT max_conns=1;
    }
    upstream u_mcb {
        kylin;
        kylin_hash $arg_k;
        zone u_mcb 64k;
        server 127.0.0.1:$TEST_NGINX_B1_PORT max_conns=1;
        server 127.0.0.1:$TEST_NGINX_B3_PORT backup max_conns=2;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { limit_rate 100; return 200 "$TEST_NGINX_PAD n1 "; } }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; location / { limit_rate 100; return 200 "$TEST_NGINX_PAD n2 "; } }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; location / { limit_rate 100; return 200 "$TEST_NGINX_PAD n3 "; } }
    server {
        listen 127.0.0.1:$TEST_NGINX_FRONT_PORT reuseport;
        error_page 502 = /busy;
        location /mc1/ { proxy_pass http://u_mc1/; }
        location /mc2/ { proxy_pass http://u_mc2/; }
        location /mcb/ { proxy_pass http://u_mcb/; }
        location = /busy { return 200 "busy "; }
    }
--- config eval
# /t includes the three lines one after the other; each line's twelve requests run together.
my $cfg = <<'_EOC_';
    location = /t {
        default_type text/html;
        ssi on;
        return 200 '<!--# include virtual="/line/mc1" wait="yes" --><!--# include virtual="/line/mc2" wait="yes" --><!--# include virtual="/line/mcb" wait="yes" -->';
    }
    location /f/ { proxy_pass http://127.0.0.1:$TEST_NGINX_FRONT_PORT/; }
_EOC_
for my $u (qw(mc1 mc2 mcb)) {
    $cfg .= "    location = /line/$u {\n        default_type text/html;\n        ssi on;\n"
        . "        return 200 '"
        . CORE::join("", map { qq{<!--# include virtual="/f/$u/?k=$_" -->} } 1 .. 12)
        . "\n';\n    }\n";
}
$cfg
--- request
GET /t
--- response_body_like eval
"\\A" . main::conns_line(n1 => 1) . main::conns_line(n1 => 1, n2 => 1)
    . main::conns_line(n1 => 1, n3 => 2) . "\\z"
--- no_error_log
[alert]
[crit]
--- timeout: 20



=== TEST 10: a resolve server without an address: as with round robin, 502, or the backup
The name never resolves (the resolver does not answer): the upstream has no primary
address. kylin answers as round robin does, 502 without a backup and the backup with one,
and logs no complaint of its own.
--- skip_nginx: 12: < 1.27.3
--- http_config
    resolver 127.0.0.1:$TEST_NGINX_DNS_PORT valid=1s;
    resolver_timeout 1s;
    upstream u_rr { zone u_rr 64k; server kylin-test.invalid:$TEST_NGINX_B1_PORT resolve; }
    upstream u_k { kylin; zone u_k 64k; server kylin-test.invalid:$TEST_NGINX_B1_PORT resolve; }
    upstream u_rb {
        zone u_rb 64k;
        server kylin-test.invalid:$TEST_NGINX_B1_PORT resolve;
        server 127.0.0.1:$TEST_NGINX_B2_PORT backup;
    }
    upstream u_kb {
        kylin;
        zone u_kb 64k;
        server kylin-test.invalid:$TEST_NGINX_B1_PORT resolve;
        server 127.0.0.1:$TEST_NGINX_B2_PORT backup;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; return 200 "backup"; }
--- config
    location /rr { proxy_pass http://u_rr; }
    location /k { proxy_pass http://u_k; }
    location /rb { proxy_pass http://u_rb; }
    location /kb { proxy_pass http://u_kb; }
--- request eval
["GET /rr", "GET /k", "GET /rb", "GET /kb"]
--- error_code eval
[502, 502, 200, 200]
--- response_body_like eval
["502 Bad Gateway", "502 Bad Gateway", "^backup\$", "^backup\$"]
--- no_error_log eval
qr/\[(?:warn|error|crit|alert|emerg)\].*kylin/
