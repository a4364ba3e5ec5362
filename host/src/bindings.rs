//! The host side of the `rolehost:state` WIT package: the one `bindgen!`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "role",
    imports: { default: async | trappable },
    exports: { default: async },
    trappable_error_type: {
        "rolehost:state/types.error" => crate::error::StateError,
    },
    with: {
        "rolehost:state/kv.bucket": crate::state::kv::Bucket,
        "rolehost:state/subjects.subject": crate::state::subjects::Subject,
        "rolehost:state/locks.lock": crate::state::locks::Lock,
    },
});

pub use self::rolehost::state::{atomics, kv, limits, locks, log, subjects, types};
