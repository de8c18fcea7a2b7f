//! Delta ADS (placeholder: being written).
