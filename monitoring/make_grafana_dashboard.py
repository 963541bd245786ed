#!/usr/bin/env python3
"""Writes grafana-kylin-dashboard.json (beside this file), the Grafana dashboard model for the
metrics of kylin_status ?format=prometheus. Edit this, run it, commit both;
scripts/check_monitoring.py fails when the two differ, and checks every query against a
real scrape evaluated by a real Prometheus."""
import json
import os
import sys
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance",upstream=~"$upstream"'
R = "$__rate_interval"
panels = []
y = 0
pid = iter(range(1, 1000))

def row(title):
    global y
    panels.append({"type": "row", "title": title, "id": next(pid), "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
    y += 1

def ts(title, desc, targets, x, w, h=8, unit="short", stack=False, extra=None):
    p = {
        "type": "timeseries", "title": title, "description": desc, "id": next(pid), "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                                                              "stacking": {"mode": "normal" if stack else "none", "group": "A"}}},
                        "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]}, "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"datasource": DS, "refId": chr(65 + i), "expr": e, "legendFormat": l} for i, (e, l) in enumerate(targets)],
    }
    if extra:
        p.update(extra)
    panels.append(p)

def stat(title, desc, expr, legend, x, w, h=4, unit="short", mappings=None, thresholds=None):
    panels.append({
        "type": "stat", "title": title, "description": desc, "id": next(pid), "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit, "mappings": mappings or [],
                                     "thresholds": thresholds or {"mode": "absolute", "steps": [{"color": "text", "value": None}]}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value", "graphMode": "none", "textMode": "value_and_name", "justifyMode": "auto"},
        "targets": [{"datasource": DS, "refId": "A", "expr": expr, "legendFormat": legend, "instant": True}],
    })

def timeline(title, desc, expr, legend, x, w, h, mappings):
    panels.append({
        "type": "state-timeline", "title": title, "description": desc, "id": next(pid), "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"mappings": mappings, "color": {"mode": "thresholds"},
                                     "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}]}}, "overrides": []},
        "options": {"showValue": "never", "mergeValues": True, "rowHeight": 0.8, "legend": {"showLegend": False}},
        "targets": [{"datasource": DS, "refId": "A", "expr": expr, "legendFormat": legend}],
    })

def valmap(pairs):
    return [{"type": "value", "options": {str(k): {"text": t, "color": c, "index": i} for i, (k, t, c) in enumerate(pairs)}}]

red = {"mode": "absolute", "steps": [{"color": "green", "value": None}, {"color": "red", "value": 1}]}

row("Overview")
stat("Live weight", "Sum of the weights of primary servers neither down nor failed (0: no live Kylin node).",
     'kylin_upstream_live_weight{%s}' % SEL, "{{upstream}}", 0, 6,
     thresholds={"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}]})
stat("In flight", "Requests in flight on the upstream, all workers.", 'kylin_upstream_in_flight_requests{%s}' % SEL, "{{upstream}}", 6, 6)
stat("Nodes over their bound", "Primary servers holding more requests than weight x the bound for weight 1.",
     'count by (upstream) ((kylin_server_in_flight_requests{%s} > on (job, instance, upstream, server) (kylin_server_weight{%s} * on (job, instance, upstream) group_left kylin_upstream_bound_requests{%s})) and on (job, instance, upstream, server) kylin_server_backup{%s} == 0) or sum by (upstream) (kylin_upstream_live_weight{%s}) * 0' % (SEL, SEL, SEL, SEL, SEL),
     "{{upstream}}", 12, 6, thresholds=red)
stat("Session store breaker open", "1 while the circuit breaker of the upstream's session store is open.",
     'kylin_session_store_breaker_state{%s,state="open"}' % SEL, "{{upstream}}", 18, 6,
     mappings=valmap([(0, "closed", "green"), (1, "OPEN", "red")]), thresholds=red)
y += 4

row("Load per node")
ts("In flight per node, and its bound", "Requests in flight per server (all workers); dashed: weight x the bound for weight 1.", [
    ('kylin_server_in_flight_requests{%s}' % SEL, "{{upstream}} {{server}}"),
    ('kylin_server_weight{%s} * on (job, instance, upstream) group_left kylin_upstream_bound_requests{%s} and on (job, instance, upstream, server) kylin_server_backup{%s} == 0' % (SEL, SEL, SEL), "bound {{upstream}} {{server}}"),
], 0, 12, extra={"fieldConfig": {"defaults": {"unit": "short", "custom": {"lineWidth": 1, "fillOpacity": 0, "showPoints": "never"}},
                                 "overrides": [{"matcher": {"id": "byRegexp", "options": "^bound .*"},
                                                "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [6, 4]}}, {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}}]}]}})
ts("Share of requests per node", "Each server's share of the upstream's requests (every try).", [
    ('sum by (upstream, server) (rate(kylin_server_requests_total{%s}[%s])) / on (upstream) group_left sum by (upstream) (rate(kylin_server_requests_total{%s}[%s]))' % (SEL, R, SEL, R), "{{upstream}} {{server}}"),
], 12, 12, unit="percentunit", stack=True)
y += 8
ts("Requests per second per node", "Requests sent to each server, every try.", [
    ('sum by (upstream, server) (rate(kylin_server_requests_total{%s}[%s]))' % (SEL, R), "{{upstream}} {{server}}"),
], 0, 12, unit="reqps")
timeline("Node state", "up, down (marked down), failed (max_fails within fail_timeout), draining.",
         'max by (upstream, server, state) (kylin_server_state{%s}) == 1' % SEL, "{{upstream}} {{server}} {{state}}", 12, 12, 8,
         [{"type": "value", "options": {"1": {"text": "yes", "color": "green"}}}])
y += 8

row("Decisions and spills")
ts("Decisions by kind", "How the balancer chose the server: sticky (the client's node), learned (the session's node), moved (its client was moved there by placement), spilled (moved off a node over its bound), failover, backup.", [
    ('sum by (upstream, route) (rate(kylin_server_decisions_total{%s}[%s]))' % (SEL, R), "{{upstream}} {{route}}"),
], 0, 12, unit="reqps", stack=True)
ts("Spilled in and out per node", "Movable requests that a node over its bound sent away (out, negative) and that a node took instead (in).", [
    ('sum by (upstream, server) (rate(kylin_server_decisions_total{%s,route="spilled"}[%s]))' % (SEL, R), "in {{upstream}} {{server}}"),
    ('-sum by (upstream, server) (rate(kylin_server_spilled_out_total{%s}[%s]))' % (SEL, R), "out {{upstream}} {{server}}"),
], 12, 12, unit="reqps")
y += 8
ts("Failed tries per node", "Tries that failed (nginx's proxy_next_upstream failures).", [
    ('sum by (upstream, server) (rate(kylin_server_failures_total{%s}[%s]))' % (SEL, R), "{{upstream}} {{server}}"),
], 0, 12, unit="reqps")
ts("Load zone", "Slots of the module's load zone in use, of its capacity; claims that found it full (servers left uncounted).", [
    ('kylin_load_zone_slots_used{instance=~"$instance"}', "used {{zone}}"),
    ('kylin_load_zone_slots{instance=~"$instance"}', "capacity {{zone}}"),
    ('increase(kylin_load_zone_claims_failed_total{instance=~"$instance"}[%s])' % R, "failed claims {{zone}}"),
], 12, 12)
y += 8
ts("Clients moved by client placement", "With kylin_balance clients: clients moved off their hot home right now, per upstream and per node they were moved to (a move is rare; a flat line is normal).", [
    ('max by (upstream) (kylin_upstream_moved_clients{%s})' % SEL, "moved {{upstream}}"),
    ('max by (upstream, server) (kylin_server_clients_moved_in{%s})' % SEL, "moved to {{upstream}} {{server}}"),
], 0, 24)
y += 8

row("Sessions")
ts("Learned sessions held", "Session routes learned from Set-Cookie, zone-wide, and the zone's capacity.", [
    ('max by (upstream, zone) (kylin_session_routes_entries{%s})' % SEL, "held {{zone}}"),
    ('max by (upstream, zone) (kylin_session_routes_capacity{%s})' % SEL, "capacity {{zone}}"),
], 0, 12)
ts("Route zone activity", "Routes learned, evicted (zone full: raise its size) and expired, per second; lookups that found a route.", [
    ('sum by (zone) (rate(kylin_session_routes_inserts_total{%s}[%s]))' % (SEL, R), "learned {{zone}}"),
    ('sum by (zone) (rate(kylin_session_routes_evictions_total{%s}[%s]))' % (SEL, R), "evicted {{zone}}"),
    ('sum by (zone) (rate(kylin_session_routes_expired_total{%s}[%s]))' % (SEL, R), "expired {{zone}}"),
    ('sum by (zone) (rate(kylin_session_routes_hits_total{%s}[%s]))' % (SEL, R), "found {{zone}}"),
], 12, 12, unit="ops")
y += 8

row("Session store")
timeline("Circuit breaker", "The session store's circuit breaker: closed (Redis asked), open (not asked), half-open (trying again).",
         'max by (upstream, state) (kylin_session_store_breaker_state{%s}) == 1' % SEL, "{{upstream}} {{state}}", 0, 8, 8,
         [{"type": "value", "options": {"1": {"text": "now", "color": "green"}}}])
ts("Lookups, errors, timeouts, skipped", "Calls to the session store per second; skipped: not asked while the breaker was open.", [
    ('sum by (upstream) (rate(kylin_session_store_lookups_total{%s}[%s]))' % (SEL, R), "lookups {{upstream}}"),
    ('sum by (upstream) (rate(kylin_session_store_errors_total{%s}[%s]))' % (SEL, R), "errors {{upstream}}"),
    ('sum by (upstream) (rate(kylin_session_store_timeouts_total{%s}[%s]))' % (SEL, R), "timeouts {{upstream}}"),
    ('sum by (upstream) (rate(kylin_session_store_skipped_total{%s}[%s]))' % (SEL, R), "skipped {{upstream}}"),
], 8, 8, unit="ops")
ts("Mean lookup latency", "Time per session-store lookup, and the answer cache's hit ratio.", [
    ('sum by (upstream) (rate(kylin_session_store_lookup_seconds_total{%s}[%s])) / sum by (upstream) (rate(kylin_session_store_lookups_total{%s}[%s]))' % (SEL, R, SEL, R), "latency {{upstream}}"),
], 16, 8, unit="s")
y += 8
ts("Answer cache", "Answers in the session-store cache (zone-wide) and its hit ratio.", [
    ('max by (upstream, zone) (kylin_session_cache_entries{%s})' % SEL, "entries {{zone}}"),
    ('sum by (upstream) (rate(kylin_session_cache_hits_total{%s}[%s])) / (sum by (upstream) (rate(kylin_session_cache_hits_total{%s}[%s])) + sum by (upstream) (rate(kylin_session_cache_misses_total{%s}[%s])))' % (SEL, R, SEL, R, SEL, R), "hit ratio {{upstream}}"),
    ('sum by (upstream) (rate(kylin_session_cache_evictions_total{%s}[%s]))' % (SEL, R), "evicted/s {{upstream}}"),
], 0, 24)
y += 8

dash = {
    "title": "Kylin upstreams (nginx kylin module)",
    "uid": "kylin-upstreams",
    "description": "Metrics of ngx_http_kylin_upstream_module's kylin_status (?format=prometheus): per-node load and share, decisions, spills, sessions, session-store health.",
    "tags": ["nginx", "kylin"],
    "timezone": "",
    "editable": True,
    "graphTooltip": 1,
    "schemaVersion": 39,
    "version": 1,
    "refresh": "30s",
    "time": {"from": "now-3h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0, "refresh": 1},
        {"name": "instance", "label": "nginx", "type": "query", "datasource": DS, "query": {"query": "label_values(kylin_upstream_live_weight, instance)", "refId": "instance"},
         "definition": "label_values(kylin_upstream_live_weight, instance)", "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "sort": 1},
        {"name": "upstream", "label": "upstream", "type": "query", "datasource": DS, "query": {"query": "label_values(kylin_upstream_live_weight{instance=~\"$instance\"}, upstream)", "refId": "upstream"},
         "definition": "label_values(kylin_upstream_live_weight{instance=~\"$instance\"}, upstream)", "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "sort": 1},
    ]},
    "annotations": {"list": []},
    "links": [],
    "panels": panels,
}


def text():
    return json.dumps(dash, indent=2) + "\n"


if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grafana-kylin-dashboard.json")
    if sys.argv[1:] == ["--check"]:
        with open(out) as f:
            sys.exit(0 if f.read() == text() else "%s differs from what %s makes: run it" % (out, sys.argv[0]))
    with open(out, "w") as f:
        f.write(text())
    print("%s: %d panels" % (out, len(panels)))
