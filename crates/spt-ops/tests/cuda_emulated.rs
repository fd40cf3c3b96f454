//! CUDA kernels checked without a GPU: a kernel file's device code is compiled for the host with
//! `kernels/emu/cuda_emu.hpp` (one OS thread per CUDA thread, barriers for `__syncthreads` and
//! warp shuffles, the PTX ISA's mma.m16n8k16 fragment layouts) and a C++ driver compares its
//! results with a reference:
//!
//! - `flash_emu_test.cpp`: the tensor-core attention kernels (`flash_attention.cu`), forward and
//!   backward against f64: dense and block-sparse, causal, key padding, ragged lengths,
//!   L_q ≠ L_k, d = 64 and 128.
//! - `block_select_emu_test.cpp`: device block selection (`block_select.cu`) against a
//!   brute-force key-by-key scoring, exact on integer data.
//! - `route_emu_test.cpp`: the routed FFN's routing on the device (`routed_ffn.cu`: top-k, the
//!   counting sort, the padded maps) against the host's rules, index for index.
//! - `sparse_attention_emu_test.cpp`: per-query sparse attention's f32 row kernels
//!   (`sparse_attention.cu`: the forward, and the backward's dq, p and ds) against f64, with
//!   empty, full and longer-than-a-warp key lists, and a NaN query row that must come out NaN.
//!
//! It needs a C++20 compiler (`$CXX`, else `c++`): g++ ≥ 11 or clang ≥ 13. On a GPU the same
//! kernels run in `cuda_parity.rs` (scripts/gpu-check.sh).

use std::path::PathBuf;
use std::process::Command;

/// Builds `kernels/emu/<name>.cpp` in emulation mode, runs it, and asserts that it reports
/// `expect`.
fn emulate(name: &str, expect: &str) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O2",
            "-pthread",
            "-DSPT_EMU",
            "-Wall",
            "-Wno-unknown-pragmas",
            "-I",
        ])
        .arg(&root)
        .arg(root.join(format!("emu/{name}.cpp")))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {cxx:?} ({e}); install g++ ≥ 11 or set CXX"));
    assert!(
        out.status.success(),
        "{cxx} failed to build {name}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&run.stdout);
    eprintln!("{stdout}");
    assert!(
        run.status.success() && stdout.contains(expect),
        "{name}: the emulated kernels differ from the reference:\n{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn flash_attention_kernels_match_f64_reference_under_emulation() {
    emulate("flash_emu_test", "flash_attention emulated: all cases pass");
}

#[test]
fn block_selection_kernels_match_brute_force_under_emulation() {
    emulate("block_select_emu_test", "block_select emulated: all cases pass");
}

#[test]
fn routing_kernels_match_host_routing_under_emulation() {
    emulate("route_emu_test", "routing emulated: all cases pass");
}

#[test]
fn sparse_attention_row_kernels_match_f64_reference_under_emulation() {
    emulate(
        "sparse_attention_emu_test",
        "sparse_attention emulated: all cases pass",
    );
}
