# Managed Redis over TLS: rediss://, certificates verified (system CAs or ca_file=), names
# checked. A real redis-server that speaks TLS only, with a certificate from a CA the test makes.
use Test::Nginx::Socket;

BEGIN {
    my $base = $ENV{TEST_NGINX_SERVER_PORT} || $ENV{TEST_NGINX_PORT} || 1984;
    $ENV{"TEST_NGINX_B${_}_PORT"} ||= $base + 10 + $_ for 1 .. 4;
    $ENV{TEST_NGINX_TLS_REDIS_PORT} ||= $base + 53;
}

use FindBin;
require "$FindBin::Bin/redis.pl";

our $SHARED = "5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE01";

if (!have_redis()) {
    plan skip_all => "redis-server and redis-cli are needed";
} elsif ($ENV{TEST_NGINX_USE_VALGRIND}) {
    # memcheck reports the records that ring's assembly encrypts as uninitialised bytes
    # (rustls' writev of a TLS 1.3 record), and TLS handshakes under valgrind outlast the
    # store's timeout. The TLS path is safe Rust (rustls, redis) over ring.
    plan skip_all => "TLS is not checked under valgrind";
} else {
    $ENV{TEST_NGINX_REDIS_CA} = start_redis_tls($ENV{TEST_NGINX_TLS_REDIS_PORT});
    redis_tls_cmd($ENV{TEST_NGINX_TLS_REDIS_PORT}, $ENV{TEST_NGINX_REDIS_CA}, "SET", $SHARED, "tomcat-session");
    plan 'no_plan';
}

no_shuffle();
no_root_location();
run_tests();

__DATA__

=== TEST 1: rediss:// with ca_file: the certificate is verified and lookups work
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_store rediss://127.0.0.1:$TEST_NGINX_TLS_REDIS_PORT ca_file=$TEST_NGINX_REDIS_CA timeout=1s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { return 200 "n1"; } }
--- config
    location / {
        proxy_pass http://kylin_nodes;
        add_header X-State $kylin_session_state;
    }
    location = /status { kylin_status; }
--- request eval
["GET /a", "GET /status"]
--- more_headers eval
["Cookie: JSESSIONID=$main::SHARED", ""]
--- response_headers eval
["X-State: shared", ""]
--- response_body_like eval
["n1", qr/"session_store":\{(?=.*"errors":0,)(?=.*"lookups":1,)(?=.*"urls":\["rediss:\/\/127\.0\.0\.1:\d+"\])/]



=== TEST 2: rediss:// verifies certificates by default: a CA the system does not trust fails
The lookup fails (the session stays on its server as unknown), and nothing else breaks.
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_store rediss://127.0.0.1:$TEST_NGINX_TLS_REDIS_PORT timeout=1s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { return 200 "n1"; } }
--- config
    location / {
        proxy_pass http://kylin_nodes;
        add_header X-State $kylin_session_state;
    }
    location = /status { kylin_status; }
--- request eval
["GET /a", "GET /status"]
--- more_headers eval
["Cookie: JSESSIONID=$main::SHARED", ""]
--- response_headers eval
["X-State: unknown", ""]
--- response_body_like eval
["n1", qr/"session_store":\{(?=.*"errors":[1-9],)(?=.*"lookups":1,)/]



=== TEST 3: rediss:// checks the name: a certificate for 127.0.0.1 is not one for 127.0.0.2
The same Redis listens on both addresses.
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_store rediss://127.0.0.2:$TEST_NGINX_TLS_REDIS_PORT ca_file=$TEST_NGINX_REDIS_CA timeout=1s;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
    server { listen 127.0.0.1:$TEST_NGINX_B1_PORT; location / { return 200 "n1"; } }
--- config
    location / {
        proxy_pass http://kylin_nodes;
        add_header X-State $kylin_session_state;
    }
    location = /status { kylin_status; }
--- request eval
["GET /a", "GET /status"]
--- more_headers eval
["Cookie: JSESSIONID=$main::SHARED", ""]
--- response_headers eval
["X-State: unknown", ""]
--- response_body_like eval
["n1", qr/"session_store":\{(?=.*"errors":[1-9],)(?=.*"lookups":1,)/]



=== TEST 4: a ca_file that cannot be read fails the configuration
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_store rediss://127.0.0.1:$TEST_NGINX_TLS_REDIS_PORT ca_file=/nonexistent/kylin-ca.pem;
        server 127.0.0.1:$TEST_NGINX_B1_PORT;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid "kylin_session_store": cannot read ca_file "\/nonexistent\/kylin-ca\.pem".* in \S+nginx\.conf:\d+/
