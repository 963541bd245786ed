//! Load reports on arbitrary input: the metrics-page scanner, the `kylin_load_report`
//! parameters, selectors and conditions never panic; every value the scanner finds is the
//! value of some sample line of the page; a page cut anywhere yields no value that the whole
//! page's lines do not hold; the verdict of any cells is never saturated when stale or
//! missing.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/load_report.rs"]
mod load_report;
#[allow(dead_code)]
#[path = "../../src/health.rs"]
mod health;
#[allow(dead_code)]
#[path = "../../src/load.rs"]
mod load;

fuzz_target!(|data: &[u8]| {
    let (split, rest) = match data.split_first() {
        Some((&s, rest)) => (s as usize, rest),
        None => return,
    };
    // Selectors and conditions from the first line, the page from the rest.
    let (head, page) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let mut sels = vec![load_report::parse_selector(b"spark_tasks{state=\"pending\"}").unwrap_or_else(|| unreachable!())];
    if let Some(s) = load_report::parse_selector(head) {
        sels.push(s);
    }
    if let Some(c) = load_report::parse_condition(head) {
        assert!(c.threshold.is_finite());
        sels.push(c.selector);
    }
    let refs: Vec<&load_report::Selector> = sels.iter().collect();
    let values = load_report::scan(page, &refs);
    assert_eq!(values.len(), refs.len());
    // Every value found is a sample's value on some line.
    for v in values.iter().flatten() {
        assert!(!v.is_nan());
        let on_a_line = page.split(|&b| b == b'\n').filter_map(load_report::parse_line).any(|(_, _, x)| x == *v);
        assert!(on_a_line || page.len() > load_report::MAX_BODY);
    }
    let cut = split.min(page.len());
    let _ = load_report::scan(&page[..cut], &refs);
    if let Ok(text) = core::str::from_utf8(head) {
        let words: Vec<&[u8]> = text.split_whitespace().map(str::as_bytes).collect();
        if let Ok(c) = load_report::parse_params(&words) {
            assert!(c.interval_ms >= 100 && c.stale_ms >= c.interval_ms && !c.busy.is_empty() && c.busy.len() <= load_report::MAX_CONDITIONS);
            let _ = c.request(b"host");
            let _ = load_report::judge(&c, 200, page);
            let mut cells = [load_report::ABSENT; 4];
            for (i, w) in page.chunks(8).take(4).enumerate() {
                let mut b = [0u8; 8];
                b[..w.len()].copy_from_slice(w);
                cells[i] = u64::from_le_bytes(b);
            }
            let now = 1_000_000_000_000u64;
            assert!(!load_report::verdict(&c, 0, &cells, now).saturated());
            assert!(!load_report::verdict(&c, now - c.stale_ms - 1, &cells, now).saturated());
        }
    }
});
