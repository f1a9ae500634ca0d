//! A qemu TCG plugin that counts the guest instructions executed by a user-mode emulated
//! process, for `cargo xtask arm-count`.
//!
//! At every translation block's translation it registers an execution callback carrying the
//! block's instruction count; each execution adds that count to one atomic counter (all guest
//! threads together). At exit the total is written to the file named by the plugin argument
//! `out=PATH` (else to standard error). The count is exact for what qemu executes, but it is a proxy
//! for time on a real core: instructions differ in cost, and caches and memory are not modelled.
//!
//! Only the handful of functions of qemu's plugin API used here are declared (API version 1, as
//! in qemu 7.2; the loader checks `qemu_plugin_version`). They are resolved from the qemu binary
//! when it loads this library.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

type PluginId = u64;

/// Opaque `struct qemu_plugin_tb`.
#[repr(C)]
pub struct Tb {
    _private: [u8; 0],
}

type TbTransCb = extern "C" fn(id: PluginId, tb: *mut Tb);
type VcpuUdataCb = extern "C" fn(vcpu_index: c_uint, userdata: *mut c_void);
type UdataCb = extern "C" fn(id: PluginId, userdata: *mut c_void);

/// `QEMU_PLUGIN_CB_NO_REGS`.
const CB_NO_REGS: c_int = 0;

unsafe extern "C" {
    fn qemu_plugin_register_vcpu_tb_trans_cb(id: PluginId, cb: TbTransCb);
    fn qemu_plugin_tb_n_insns(tb: *const Tb) -> usize;
    fn qemu_plugin_register_vcpu_tb_exec_cb(
        tb: *mut Tb,
        cb: VcpuUdataCb,
        flags: c_int,
        userdata: *mut c_void,
    );
    fn qemu_plugin_register_atexit_cb(id: PluginId, cb: UdataCb, userdata: *mut c_void);
}

/// The plugin API version this library was written against (qemu 7.2 accepts 0..=1).
#[unsafe(no_mangle)]
pub static qemu_plugin_version: c_int = 1;

static EXECUTED: AtomicU64 = AtomicU64::new(0);
static OUT: OnceLock<Option<String>> = OnceLock::new();

extern "C" fn on_exec(_vcpu: c_uint, userdata: *mut c_void) {
    EXECUTED.fetch_add(userdata as usize as u64, Ordering::Relaxed);
}

extern "C" fn on_translate(_id: PluginId, tb: *mut Tb) {
    // SAFETY: `tb` is the block qemu is translating, valid for this callback.
    unsafe {
        let n = qemu_plugin_tb_n_insns(tb);
        qemu_plugin_register_vcpu_tb_exec_cb(tb, on_exec, CB_NO_REGS, n as *mut c_void);
    }
}

extern "C" fn on_exit(_id: PluginId, _userdata: *mut c_void) {
    let total = EXECUTED.load(Ordering::Relaxed);
    let line = format!("insn-count: {total} instructions executed\n");
    match OUT.get().cloned().flatten() {
        Some(path) => {
            if let Err(e) = std::fs::write(&path, format!("{total}\n")) {
                eprintln!("insn-count: cannot write {path}: {e}");
            }
        }
        None => eprint!("{line}"),
    }
}

/// Entry point called by qemu when the plugin is loaded (`-plugin libinsn_count.so,out=FILE`).
///
/// # Safety
/// Called by qemu with `argc` valid C strings in `argv`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qemu_plugin_install(
    id: PluginId,
    _info: *const c_void,
    argc: c_int,
    argv: *const *const c_char,
) -> c_int {
    let mut out = None;
    for i in 0..argc.max(0) as usize {
        // SAFETY: qemu passes argc valid strings.
        let arg = unsafe { CStr::from_ptr(*argv.add(i)) }.to_string_lossy();
        match arg.split_once('=') {
            Some(("out", path)) if !path.is_empty() => out = Some(path.to_string()),
            _ => {
                eprintln!("insn-count: unknown argument {arg:?} (only out=PATH)");
                return -1;
            }
        }
    }
    let _ = OUT.set(out);
    // SAFETY: registering callbacks with the id qemu gave us.
    unsafe {
        qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
        qemu_plugin_register_atexit_cb(id, on_exit, std::ptr::null_mut());
    }
    0
}
