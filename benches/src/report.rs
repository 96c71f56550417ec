//! Rows of the results table and how they print.

/// What a ratio is held to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// The ratio must not exceed this.
    AtMost(f64),
    /// The ratio must reach this.
    AtLeast(f64),
    /// Reported only.
    Report,
}

impl Goal {
    /// Whether `ratio` meets the goal (`None` for [`Goal::Report`]).
    pub fn met(self, ratio: f64) -> Option<bool> {
        match self {
            Self::AtMost(bound) => Some(ratio <= bound),
            Self::AtLeast(bound) => Some(ratio >= bound),
            Self::Report => None,
        }
    }
}

impl std::fmt::Display for Goal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::AtMost(bound) => write!(f, "≤ {bound}"),
            Self::AtLeast(bound) => write!(f, "≥ {bound}"),
            Self::Report => write!(f, "report"),
        }
    }
}

/// One measured ratio: ours over the reference, both measured in the same run.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Benchmark id (`P1`, `P2`, …).
    pub id: &'static str,
    /// What was measured.
    pub what: String,
    /// Our figure, with its unit.
    pub ours: String,
    /// The reference figure, with its unit.
    pub reference: String,
    /// `ours / reference` (or the inverse for throughputs, so that the goal reads naturally).
    pub ratio: f64,
    /// The goal for the ratio.
    pub goal: Goal,
}

impl Row {
    /// Whether the ratio meets its goal (`None` when only reported or not measurable).
    pub fn met(&self) -> Option<bool> {
        if self.ratio.is_finite() { self.goal.met(self.ratio) } else { None }
    }

    /// One line for progress output.
    pub fn summary(&self) -> String {
        format!(
            "{} {}: {} vs {} -> {:.3} (goal {})",
            self.id, self.what, self.ours, self.reference, self.ratio, self.goal
        )
    }
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out =
        String::from("| id | what | ours | reference | ratio | goal | met |\n|---|---|---:|---:|---:|---|---|\n");
    for row in rows {
        let met = match row.met() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let ratio = if row.ratio.is_finite() { format!("{:.2}", row.ratio) } else { "—".into() };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            row.id, row.what, row.ours, row.reference, ratio, row.goal, met
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_compare_in_the_right_direction() {
        assert_eq!(Goal::AtMost(1.02).met(1.01), Some(true));
        assert_eq!(Goal::AtMost(1.02).met(1.03), Some(false));
        assert_eq!(Goal::AtLeast(0.95).met(0.94), Some(false));
        assert_eq!(Goal::AtLeast(0.95).met(1.2), Some(true));
        assert_eq!(Goal::Report.met(0.1), None);
    }

    #[test]
    fn table_marks_missed_goals() {
        let row = |ratio| Row {
            id: "P1",
            what: "step".into(),
            ours: "1 ms".into(),
            reference: "1 ms".into(),
            ratio,
            goal: Goal::AtMost(1.02),
        };
        let table = markdown(&[row(1.0), row(1.5), row(f64::NAN)]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(lines[2].ends_with("| 1.00 | ≤ 1.02 | yes |"), "{}", lines[2]);
        assert!(lines[3].ends_with("| 1.50 | ≤ 1.02 | **no** |"), "{}", lines[3]);
        assert!(lines[4].ends_with("| — | ≤ 1.02 | — |"), "{}", lines[4]);
    }
}
