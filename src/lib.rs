pub use spt_models as models;
pub use spt_ops as ops;
pub use spt_train as train;
