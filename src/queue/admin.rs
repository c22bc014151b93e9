//! Operator queries behind the CLI: waiting on, cancelling and requeueing tasks, and the dead-letter table.

use super::Queue;

impl Queue {}
