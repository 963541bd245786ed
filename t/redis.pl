# Shared by the .t files that need Redis: starts a private redis-server (and, on request, a
# three-master Redis Cluster) for this test file and stops it at exit.
#
#   my $port = start_redis($port);            # standalone, no persistence
#   redis_cmd($port, "SET", "k", "v");
#   my @ports = start_redis_cluster(@ports);  # three masters, all 16384 slots covered
use strict;
use warnings;
use File::Temp qw(tempdir);
use POSIX ();

our @RedisPids;
our $RedisOwner = $$;   # END runs in forked children too: only the owner stops Redis
our $RedisDir = tempdir("kylin-redis-XXXXXX", TMPDIR => 1, CLEANUP => 1);

sub have_redis { return system("command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1") == 0 }

sub wait_redis {
    my ($port) = @_;
    for (1 .. 100) {
        my $out = `redis-cli -p $port PING 2>/dev/null`;
        return 1 if defined $out && $out =~ /PONG/;
        select undef, undef, undef, 0.05;
    }
    die "redis-server on port $port did not start\n";
}

sub start_redis {
    my ($port, @extra) = @_;
    my $dir = "$RedisDir/$port";
    mkdir $dir;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        open STDOUT, '>', "$dir/out.log";
        open STDERR, '>&', \*STDOUT;
        { exec "redis-server", "--port", $port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", $dir, @extra; }
        POSIX::_exit(127);
    }
    push @RedisPids, $pid;
    wait_redis($port);
    return $port;
}

sub redis_cmd {
    my ($port, @args) = @_;
    system("redis-cli", "-p", $port, @args) == 0 or die "redis-cli @args failed\n";
}

sub start_redis_cluster {
    my @ports = @_;
    for my $p (@ports) {
        start_redis($p, "--cluster-enabled", "yes", "--cluster-config-file", "nodes-$p.conf",
            "--cluster-node-timeout", "2000");
    }
    my $nodes = join " ", map { "127.0.0.1:$_" } @ports;
    system("redis-cli --cluster create $nodes --cluster-replicas 0 --cluster-yes >$RedisDir/cluster-create.log 2>&1") == 0
        or die "redis-cli --cluster create failed\n";
    # Every node must see the whole cluster (not just the first one).
    for (1 .. 100) {
        my $ready = grep {
            my $info = `redis-cli -p $_ CLUSTER INFO 2>/dev/null`;
            $info =~ /cluster_state:ok/ && $info =~ /cluster_known_nodes:3\b/ && $info =~ /cluster_slots_ok:16384/
        } @ports;
        return @ports if $ready == @ports;
        select undef, undef, undef, 0.1;
    }
    die "the Redis cluster did not become ready\n";
}

sub stop_redis {
    for my $pid (@RedisPids) {
        kill 'TERM', $pid;
        waitpid $pid, 0;
    }
    @RedisPids = ();
}

END { local $?; stop_redis() if $$ == $RedisOwner }   # keep the test's exit status

1;
