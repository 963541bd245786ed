# kylin_session_store against a local three-master Redis Cluster (the seed deployment keeps
# sessions in a cluster): sessions whose keys live on different masters are found.
use Test::Nginx::Socket;

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
    $ENV{TEST_NGINX_REALIP_PORT} ||= $base + 20;
    $ENV{"TEST_NGINX_CLUSTER${_}_PORT"} ||= $base + 32 + $_ for 1 .. 3;
    $ENV{TEST_NGINX_PAD} = "." x 120;
}

use FindBin;
require "$FindBin::Bin/ssi.pl";
require "$FindBin::Bin/redis.pl";

# Session ids whose keys hash to slots of each of the three masters (redis-cli --cluster
# create gives the masters 0-5460, 5461-10922 and 10923-16383).
our @SHARED;

if (!have_redis()) {
    plan skip_all => "redis-server and redis-cli are needed";
} else {
    my @ports = start_redis_cluster(map { $ENV{"TEST_NGINX_CLUSTER${_}_PORT"} } 1 .. 3);
    my %by_master;
    for my $i (1 .. 200) {
        my $id = sprintf "C1A55E%026X", $i;
        my $slot = `redis-cli -p $ports[0] CLUSTER KEYSLOT $id` + 0;
        $by_master{ $slot < 5461 ? 0 : $slot < 10923 ? 1 : 2 } //= $id;
        last if keys %by_master == 3;
    }
    @SHARED = map { $by_master{$_} } 0 .. 2;
    system("redis-cli", "-c", "-p", $ports[0], "SET", $_, "tomcat-session") == 0 or die "SET $_" for @SHARED;
    plan 'no_plan';
}

# nginx 1.29.7+ keeps upstream connections alive by default, and here nginx is client, kylin
# upstream and node at once: each idle kept-alive connection is counted on both of its ends,
# and Test::Nginx's default of 64 worker_connections makes nginx close some early (with a
# warning).
worker_connections(512);
no_shuffle();
no_root_location();
run_tests();

__DATA__

=== TEST 1: shared sessions found through the cluster spill; a local one stays
For each of three shared sessions (keys on different masters) and one local session: two
requests to learn the verdict (the second asks again if the first lookup failed), then
twelve concurrent ones.
--- http_config eval
main::client_server() . <<'_EOC_'
    kylin_upstream kylin_nodes {
        kylin_balance requests;
        kylin_session_store redis://127.0.0.1:$TEST_NGINX_CLUSTER1_PORT redis://127.0.0.1:$TEST_NGINX_CLUSTER2_PORT redis://127.0.0.1:$TEST_NGINX_CLUSTER3_PORT format=tomcat timeout=1s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
        server 127.0.0.1:$TEST_NGINX_B2_PORT;
        server 127.0.0.1:$TEST_NGINX_B3_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { limit_rate 100; return 200 "$TEST_NGINX_PAD n1"; } }
    server { listen 127.0.0.1:$TEST_NGINX_B2_PORT; location / { limit_rate 100; return 200 "$TEST_NGINX_PAD n2"; } }
    server { listen 127.0.0.1:$TEST_NGINX_B3_PORT; location / { limit_rate 100; return 200 "$TEST_NGINX_PAD n3"; } }
_EOC_
--- config eval
my @lines;
for my $sid (@main::SHARED, "10CA110CA110CA110CA110CA110CA101") {
    push @lines, (qq{<!--# include virtual="/via/10.77.0.1/s/$sid" wait="yes" -->}) x 2,
        CORE::join("", (qq{<!--# include virtual="/via/10.77.0.1/s/$sid" -->}) x 12);
}
main::ssi_page(@lines, q{<!--# include virtual="/status-via" wait="yes" -->})
    . main::via_location() . <<'_EOC_';
    location = /status-via { proxy_pass http://127.0.0.1:$TEST_NGINX_REALIP_PORT/status; }
_EOC_
--- request
GET /t
--- response_body_like eval
my $spread = qr/\.+ n\d\n\.+ n\d\n(?=(?:\.+ n\d){0,11}\.+ (n\d)(?:\.+ n\d)*?\.+ (?!\g{-1})n\d)(?:\.+ n\d){12}\n/;
my $stay = qr/\.+ (n\d)\n\.+ \g{-1}\n(?:\.+ \g{-1}){12}\n/;
qr/\A$spread$spread$spread$stay\{(?=.*"kind":"redis-cluster")(?=.*"breaker":"closed")(?=.*"lookups":[4-8],)/s
--- no_error_log
[error]
[warn]
--- timeout: 30
