//! `zoo list`: the families, their classes and the presets with parameter counts.

use bmtrain_backend::Cpu;
use models::{AnyModel, Architecture, Family, count_params, presets};

/// Prints the table. Parameter counts come from lazily built models: nothing is allocated.
pub fn run() -> anyhow::Result<()> {
    let device = Default::default();
    println!("families:");
    for family in Family::ALL {
        let classes: Vec<&str> = Architecture::ALL
            .into_iter()
            .filter(|a| a.family() == family)
            .map(Architecture::hf_name)
            .collect();
        println!("  {:<9} {}", family.model_type(), classes.join(", "));
    }
    println!();
    println!(
        "{:<20} {:<9} {:<34} {:>10} {:>16}",
        "preset", "family", "class (body params)", "params", "exact"
    );
    for preset in presets() {
        let model = AnyModel::<Cpu>::new(preset.architecture, &preset.config, &device)?;
        let encoder = AnyModel::<Cpu>::new(
            Architecture::base(preset.architecture.family()),
            &preset.config,
            &device,
        )?;
        let total = count_params::<Cpu, _>(&model);
        let class = format!(
            "{} ({})",
            preset.architecture.hf_name(),
            human(count_params::<Cpu, _>(&encoder))
        );
        println!(
            "{:<20} {:<9} {:<34} {:>10} {:>16}",
            preset.name,
            preset.architecture.family().model_type(),
            class,
            human(total),
            grouped(total)
        );
    }
    Ok(())
}

/// `109482240` → `109.5M`.
fn human(count: usize) -> String {
    match count {
        n if n >= 1_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// `109482240` → `109,482,240`.
fn grouped(count: usize) -> String {
    let digits = count.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_formatted_for_people() {
        assert_eq!(human(109_482_240), "109.5M");
        assert_eq!(grouped(109_482_240), "109,482,240");
        assert_eq!(grouped(999), "999");
    }
}
