//! The CUDA flash-attention kernels checked without a GPU: `kernels/flash_attention.cu`'s device
//! code is compiled for the host with `kernels/emu/cuda_emu.hpp` (one OS thread per CUDA thread,
//! barriers for `__syncthreads` and warp shuffles, the PTX ISA's mma.m16n8k16 fragment layouts)
//! and `kernels/emu/flash_emu_test.cpp` compares its forward and backward with an f64 reference:
//! dense and block-sparse, causal, key padding, ragged lengths, L_q ≠ L_k, d = 64 and 128.
//!
//! It needs a C++20 compiler (`$CXX`, else `c++`): g++ ≥ 11 or clang ≥ 13. On a GPU the same
//! kernels run in `cuda_parity.rs` (scripts/gpu-check.sh).

use std::path::PathBuf;
use std::process::Command;

#[test]
fn flash_attention_kernels_match_f64_reference_under_emulation() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("flash_emu_test");
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
        .arg(root.join("emu/flash_emu_test.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {cxx:?} ({e}); install g++ ≥ 11 or set CXX"));
    assert!(
        out.status.success(),
        "{cxx} failed to build the emulated kernels:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe)
        .output()
        .expect("the emulated kernel test runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    eprintln!("{stdout}");
    assert!(
        run.status.success(),
        "emulated flash-attention kernels differ from the f64 reference:\n{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("all cases pass"), "unexpected output:\n{stdout}");
}
