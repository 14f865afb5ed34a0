//! Cedar for toolgate: load a policy directory, validate it strictly, index policies by
//! action, and evaluate tool calls fail-closed (any error denies). No I/O beyond reading files.
#![forbid(unsafe_code)]

mod engine;
mod load;
mod reads;
mod schema_info;
#[doc(hidden)]
pub mod testing;
mod validate;

pub use engine::{
    coerce, coerce_record, described, uid, utc_millis, ApprovalContext, At, AuthzRequest,
    CedarOutcome, Decision, Env, PolicyEngine, Principal, Resource, ShadowDecision, TaskContext,
    NAMESPACE,
};
pub use load::{
    error_chain, load_dir, load_dir_cached, load_schema, parse_fragment, parse_policy_file,
    LoadCache, LoadError, Loaded, PolicySource, Problem, ENTITIES_FILE, SCHEMA_FILE,
};
pub use reads::ArgReads;
pub use schema_info::{ActionContext, AttrType, Record, SchemaInfo};
pub use validate::{validate_whole, SlicedValidator};
