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
    },
});

pub use self::rolehost::state::{atomics, kv, log, types};
