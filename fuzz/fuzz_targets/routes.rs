//! The shared route table under arbitrary operation sequences (insert, lookup, remove,
//! expire, with arbitrary clocks): never panics, never exceeds its capacity, and a lookup
//! never returns a value that was not stored for that key.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;

#[allow(dead_code)]
#[path = "../../src/routes.rs"]
mod routes;

fuzz_target!(|data: &[u8]| {
    let mut region = vec![0u64; 256];
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut region);
    let Ok(mut t) = routes::RouteTable::format(bytes, [7, 9]) else { return };
    let cap = t.capacity();
    let mut seen: HashMap<u128, Vec<u64>> = HashMap::new();
    for op in data.chunks(4) {
        let [o, k, v, clock] = [op[0], *op.get(1).unwrap_or(&0), *op.get(2).unwrap_or(&0), *op.get(3).unwrap_or(&0)];
        let key = u128::from(k % 40) + 1;
        let now = i64::from(clock) * 10;
        match o % 4 {
            0 => {
                t.insert(key, u64::from(v), now, 100);
                seen.entry(key).or_default().push(u64::from(v));
            }
            1 => {
                if let Some(got) = t.lookup(key, now, 100) {
                    assert!(seen.get(&key).is_some_and(|vs| vs.contains(&got)));
                }
            }
            2 => {
                t.remove(key);
            }
            _ => {
                t.expire(now, 100, 8);
            }
        }
        assert!(t.len() <= cap);
    }
});
