//! `bmt.inspect`-style statistics of every parameter and its gradient, gathered across shards,
//! and a fixed-width table of them.

/// Statistics of one parameter (and of its gradient, when there is one).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamStats {
    /// Full name (`<segment prefix>.<parameter>`).
    pub name: String,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Mean.
    pub mean: f32,
    /// Standard deviation (population).
    pub std: f32,
    /// Minimum.
    pub min: f32,
    /// Maximum.
    pub max: f32,
    /// Mean of the gradient.
    pub grad_mean: Option<f32>,
    /// Standard deviation of the gradient.
    pub grad_std: Option<f32>,
}

/// `(mean, std, min, max)` of values, accumulated in f64.
pub fn moments(values: &[f32]) -> (f32, f32, f32, f32) {
    if values.is_empty() {
        return (0.0, 0.0, 0.0, 0.0);
    }
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    let min = values.iter().copied().fold(f32::INFINITY, f32::min);
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (mean as f32, var.sqrt() as f32, min, max)
}

/// The table `bmt.inspect.format_summary` prints: name, shape, max, min, std, mean, grad std,
/// grad mean.
pub fn format_table(stats: &[ParamStats]) -> String {
    let width = stats.iter().map(|s| s.name.len()).max().unwrap_or(4).max(4);
    let mut out = format!(
        "{:<width$}  {:<16} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "name", "shape", "max", "min", "std", "mean", "grad_std", "grad_mean"
    );
    let number = |v: Option<f32>| v.map_or("-".to_string(), |v| format!("{v:.3e}"));
    for s in stats {
        out.push_str(&format!(
            "{:<width$}  {:<16} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            s.name,
            format!("{:?}", s.shape),
            number(Some(s.max)),
            number(Some(s.min)),
            number(Some(s.std)),
            number(Some(s.mean)),
            number(s.grad_std),
            number(s.grad_mean),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_are_the_textbook_ones() {
        let (mean, std, min, max) = moments(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!((mean, min, max), (2.5, 1.0, 4.0));
        assert!((std - 1.25f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn the_table_has_one_row_per_parameter() {
        let row = ParamStats {
            name: "blocks.0.attention.query.weight".into(),
            shape: vec![4, 4],
            mean: 0.0,
            std: 1.0,
            min: -2.0,
            max: 2.0,
            grad_mean: None,
            grad_std: Some(0.5),
        };
        let table = format_table(&[row.clone(), row]);
        assert_eq!(table.lines().count(), 3);
        assert!(table.contains("grad_mean") && table.contains("[4, 4]") && table.contains(" -"));
    }
}
