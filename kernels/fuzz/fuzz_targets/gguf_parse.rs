//! Any byte string given to the GGUF parser yields a header or an error —
//! never a panic, an overflow, or an allocation the input cannot justify.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = kernels::gguf::parse(data) {
        // Whatever parsed must describe tensors inside the input.
        for tensor in &header.tensors {
            assert!(tensor.start + tensor.bytes <= data.len() as u64);
        }
    }
});
