# Misuse fails at configuration time with a clear message and the file and line.
use Test::Nginx::Socket 'no_plan';

no_shuffle();
run_tests();

__DATA__

=== TEST 1: kylin twice in one upstream block
--- http_config
    upstream kylin_nodes {
        kylin;
        kylin;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin" directive is duplicate in \S+nginx\.conf:\d+/



=== TEST 2: kylin inside kylin_upstream
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:1;
        kylin;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin" directive is duplicate: "kylin_upstream" already selects the kylin balancer in \S+nginx\.conf:\d+/



=== TEST 3: ip_hash after kylin replaces it: refused, naming the kylin line
--- http_config
    upstream kylin_nodes {
        server 127.0.0.1:1;
        kylin;
        ip_hash;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*another load balancing method replaces "kylin" in upstream "kylin_nodes".* in \S+nginx\.conf:\d+/



=== TEST 4: kylin after hash
--- http_config
    upstream kylin_nodes {
        hash $remote_addr consistent;
        kylin;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin" must be the first load balancing directive of the block.* in \S+nginx\.conf:\d+/



=== TEST 5: least_conn inside kylin_upstream
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:1;
        least_conn;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*another load balancing method replaces "kylin" in upstream "kylin_nodes".* in \S+nginx\.conf:\d+/



=== TEST 6: random after keepalive inside kylin_upstream (keepalive does not hide it)
--- http_config
    kylin_upstream kylin_nodes {
        server 127.0.0.1:1;
        keepalive 4;
        random;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*another load balancing method replaces "kylin" in upstream "kylin_nodes"/



=== TEST 7: kylin after keepalive in a stock upstream (before nginx 1.29.7)
Before 1.29.7 the keepalive directive installs its wrapper when it is read, and kylin would
replace it; since then keepalive wraps every balancer later, and the order is free (t/015).
--- skip_nginx: 2: >= 1.29.7
--- http_config
    upstream kylin_nodes {
        server 127.0.0.1:1;
        keepalive 4;
        kylin;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"keepalive"(?: and "sticky")? must follow it in \S+nginx\.conf:\d+/



=== TEST 8: kylin_upstream without servers
--- http_config
    kylin_upstream kylin_nodes {
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*no servers are inside upstream in \S+nginx\.conf:\d+/



=== TEST 9: kylin takes no arguments
--- http_config
    upstream kylin_nodes {
        kylin on;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid number of arguments in "kylin" directive in \S+nginx\.conf:\d+/



=== TEST 10: kylin_upstream takes exactly one name
--- http_config
    kylin_upstream kylin_nodes extra {
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid number of arguments in "kylin_upstream" directive in \S+nginx\.conf:\d+/



=== TEST 11: kylin_upstream names may not look like addresses
--- http_config
    kylin_upstream kylin:8080 {
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*invalid upstream name "kylin:8080" in "kylin_upstream".* in \S+nginx\.conf:\d+/



=== TEST 12: kylin_upstream with the name of an existing upstream
--- http_config
    upstream kylin_nodes {
        server 127.0.0.1:1;
    }
    kylin_upstream kylin_nodes {
        server 127.0.0.1:2;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*duplicate upstream "kylin_nodes" in \S+nginx\.conf:\d+/



=== TEST 13: kylin outside an upstream block
--- http_config
    kylin;
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin" directive is not allowed here in \S+nginx\.conf:\d+/



=== TEST 14: kylin_upstream inside a server block
--- http_config
--- config
    kylin_upstream inner {
        server 127.0.0.1:1;
    }
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin_upstream" directive is not allowed here in \S+nginx\.conf:\d+/



=== TEST 15: a session store host that does not resolve fails the configuration
Store host names are resolved when the configuration is read (no lookup ever waits for DNS);
the message hides the credentials.
--- http_config
    kylin_upstream kylin_nodes {
        kylin_session_store redis://u:hunter2@no-such-host.invalid:6379;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
[qr/\[emerg\] .*invalid "kylin_session_store": host not found in "redis:\/\/\*\*\*\@no-such-host\.invalid:6379".* in \S+nginx\.conf:\d+/]
--- no_error_log
hunter2



=== TEST 16: least_time after kylin (nginx 1.31+) replaces it: refused
--- skip_nginx: 2: < 1.31.0
--- http_config
    upstream kylin_nodes {
        kylin;
        least_time header;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*another load balancing method replaces "kylin" in upstream "kylin_nodes": use only one of "kylin", "ip_hash", "hash", "least_conn", "least_time", "random" in \S+nginx\.conf:\d+/



=== TEST 17: kylin after least_time (nginx 1.31+): refused
--- skip_nginx: 2: < 1.31.0
--- http_config
    upstream kylin_nodes {
        least_time header;
        kylin;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin" must be the first load balancing directive of the block: it cannot be combined with "ip_hash", "hash", "least_conn", "least_time", "random", and "sticky" must follow it in \S+nginx\.conf:\d+/



=== TEST 18: sticky before kylin (nginx 1.29.6+): refused, saying sticky must follow
--- skip_nginx: 2: < 1.29.6
--- http_config
    upstream kylin_nodes {
        sticky cookie srv_id;
        kylin;
        server 127.0.0.1:1;
    }
--- config
--- must_die
--- error_log eval
qr/\[emerg\] .*"kylin" .*"sticky" must follow.* in \S+nginx\.conf:\d+/
