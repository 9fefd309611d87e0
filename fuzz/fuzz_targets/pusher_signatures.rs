#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herald_fuzz::pusher_signatures(data));
