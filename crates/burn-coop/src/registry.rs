//! The registries of rules and schedules: configurations that can be written to a file, given
//! on the command line and built once the number of workers is known.
//!
//! Each rule and schedule owns its configuration: one struct with serde and clap derives,
//! living in the rule's or schedule's own file and implementing [`RuleConfig`] or
//! [`ScheduleConfig`]. The registries (in `rules/mod.rs` and `schedule/mod.rs`, next to the
//! `mod` lines) list them, one line each, and generate from that list the tagged [`RuleSpec`] /
//! [`ScheduleSpec`] enums, their name enums for `--rule` and `--schedule`, and
//! [`RuleFlags`](crate::rules::RuleFlags) / [`ScheduleFlags`](crate::schedule::ScheduleFlags), the
//! command-line flags of every entry.
//! Settings are optional (`None` is the documented default), so a file and flags can be
//! layered: flags override the file, which overrides the defaults. Nothing is validated until
//! [`RuleSpec::build`] / [`ScheduleSpec::build`] learn the real number of workers.

use serde::Serialize;
use serde::de::{DeserializeOwned, Visitor};
use serde_json::{Map, Value};

use crate::rules::{CooperativeRule, RuleSpec};
use crate::schedule::{ScheduleSpec, SyncSchedule};

/// A setting that cannot run, named as in a configuration file and on the command line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value '{value}' for '{option}': {reason}")]
pub struct SpecError {
    /// The setting's name (the flag without `--`, the key in a file).
    pub option: &'static str,
    /// The value given.
    pub value: String,
    /// Why it cannot run.
    pub reason: String,
}

impl SpecError {
    /// `option = value` cannot run because of `reason`.
    pub fn new(option: &'static str, value: impl Into<String>, reason: impl ToString) -> Self {
        Self { option, value: value.into(), reason: reason.to_string() }
    }
}

/// A merge rule's configuration (see the [module documentation](self)).
pub trait RuleConfig:
    Clone + Default + std::fmt::Debug + PartialEq + Serialize + DeserializeOwned + clap::Args + Send + Sync + 'static
{
    /// The name used by `--rule` and in files.
    const NAME: &'static str;

    /// The rule for `world_size` workers, after checking every setting against it (the rule
    /// refuses to run with another number of workers), as a merge rule with its theory.
    fn build(&self, world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError>;

    /// A short human description for logs (`"elastic averaging, alpha = 0.25"`).
    fn describe(&self) -> String;

    /// A short tag for folder names.
    fn run_tag(&self) -> String {
        Self::NAME.to_string()
    }

    /// A period the rule imposes on any schedule (synchronous SGD: 1).
    fn forced_period(&self) -> Option<u64> {
        None
    }

    /// The period the rule's paper uses, taken by the fixed schedule when no `--tau` is given
    /// (Overlap Local-SGD: 2).
    fn default_period(&self) -> Option<u64> {
        None
    }

    /// What the rule's authors do with buffers (BatchNorm running statistics) when the run does
    /// not say (`--buffers`): `None` for the project's default, merging them.
    fn default_buffers(&self) -> Option<crate::params::BufferPolicy> {
        None
    }

    /// The configuration with every default that does not depend on the number of workers
    /// written out (for resolved configuration files).
    fn resolved(&self) -> Self {
        self.clone()
    }
}

/// A synchronization schedule's configuration (see the [module documentation](self)).
pub trait ScheduleConfig:
    Clone + Default + std::fmt::Debug + PartialEq + Serialize + DeserializeOwned + clap::Args + Send + Sync + 'static
{
    /// The name used by `--schedule` and in files.
    const NAME: &'static str;

    /// The schedule, after checking every setting.
    fn build(&self) -> Result<Box<dyn SyncSchedule>, SpecError>;

    /// A short human description for logs (`"tau = 8"`).
    fn describe(&self) -> String;

    /// A short tag for folder names (`"tau8"`).
    fn run_tag(&self) -> String;

    /// The configuration with every default written out.
    fn resolved(&self) -> Self {
        self.clone()
    }
}

/// Generates a registry: the tagged spec enum, the name enum and the flags struct.
macro_rules! registry {
    (
        $(#[$spec_meta:meta])* spec $Spec:ident;
        $(#[$name_meta:meta])* names $Name:ident;
        $(#[$flags_meta:meta])* flags $Flags:ident, flag $flag:literal, key $key:ident, what $what:literal;
        trait $Trait:ident;
        default $Default:ident;
        dyn $Dyn:ident;
        shared $Shared:ty;
        $( $(#[$variant_meta:meta])* $Variant:ident($field:ident: $Config:ty), )+
    ) => {
        $(#[$spec_meta])*
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(tag = "kind", rename_all = "kebab-case")]
        pub enum $Spec {
            $( $(#[$variant_meta])* $Variant($Config), )+
        }

        $(#[$name_meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
        #[serde(rename_all = "kebab-case")]
        pub enum $Name {
            $( $(#[$variant_meta])* $Variant, )+
        }

        impl Default for $Spec {
            fn default() -> Self {
                Self::$Default(Default::default())
            }
        }

        impl $Name {
            /// The name as written in files and on the command line.
            pub fn as_str(self) -> &'static str {
                match self { $( Self::$Variant => <$Config as $crate::registry::$Trait>::NAME, )+ }
            }
        }

        impl $Spec {
            /// The entry's settings, as a trait object.
            pub fn config(&self) -> &dyn $crate::registry::$Dyn {
                match self { $( Self::$Variant(c) => c, )+ }
            }

            /// Which entry this is.
            pub fn name(&self) -> $Name {
                match self { $( Self::$Variant(_) => $Name::$Variant, )+ }
            }

            /// The entry `name` with its default settings.
            pub fn default_of(name: $Name) -> Self {
                match name { $( $Name::$Variant => Self::$Variant(Default::default()), )+ }
            }

            /// A short human description for logs.
            pub fn describe(&self) -> String {
                self.config().describe()
            }

            /// A short tag for folder names.
            pub fn run_tag(&self) -> String {
                self.config().run_tag()
            }

            /// The settings with every default that can be written out written out.
            pub fn resolved(&self) -> Self {
                match self { $( Self::$Variant(c) => Self::$Variant($crate::registry::$Trait::resolved(c)), )+ }
            }

            /// Every key of this registry: the name's and every entry's settings.
            pub fn keys() -> Vec<&'static str> {
                let mut keys = vec![$flag];
                $(
                    for key in $crate::registry::field_names::<$Config>() {
                        if !keys.contains(key) {
                            keys.push(key);
                        }
                    }
                )+
                keys
            }

            /// The settings as flat `key = value` pairs, the name under `
            #[doc = $flag]
            /// ` (the form of `coop train`'s configuration file).
            pub fn to_flat(&self) -> serde_json::Map<String, serde_json::Value> {
                let mut map = match self { $( Self::$Variant(c) => $crate::registry::to_map(c), )+ };
                map.insert($flag.into(), serde_json::Value::String(self.name().as_str().into()));
                map
            }

            /// Takes this registry's keys out of a flat table: the name under `
            #[doc = $flag]
            /// ` (default: the registry's default) and the settings of that entry. A setting
            /// of another entry is an error naming both.
            pub fn take_from_flat(table: &mut serde_json::Map<String, serde_json::Value>) -> Result<Self, $crate::registry::SpecError> {
                let name = match table.remove($flag) {
                    None => Self::default().name(),
                    Some(value) => serde_json::from_value::<$Name>(value.clone()).map_err(|e| {
                        $crate::registry::SpecError::new($flag, value.as_str().map_or_else(|| value.to_string(), str::to_string), e)
                    })?,
                };
                let mut mine = serde_json::Map::new();
                $(
                    for key in $crate::registry::field_names::<$Config>() {
                        if let Some(value) = table.remove(*key) {
                            if name == $Name::$Variant {
                                mine.insert(key.to_string(), value);
                            } else if !field_names_of(name).contains(key) {
                                return Err($crate::registry::SpecError::new(key, value.to_string(), format!(
                                    "'{key}' is a setting of the {} {}, but this run uses {}",
                                    <$Config as $crate::registry::$Trait>::NAME, $what, name.as_str()
                                )));
                            } else {
                                mine.insert(key.to_string(), value);
                            }
                        }
                    }
                )+
                let spec = match name {
                    $( $Name::$Variant => Self::$Variant($crate::registry::from_map(mine, $flag)?), )+
                };
                return Ok(spec);

                fn field_names_of(name: $Name) -> &'static [&'static str] {
                    match name { $( $Name::$Variant => $crate::registry::field_names::<$Config>(), )+ }
                }
            }
        }

        $(#[$flags_meta])*
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct $Flags {
            #[doc = concat!("The ", $what, " (default: ", stringify!($Default), ").")]
            #[arg(long = $flag, value_enum)]
            pub $key: Option<$Name>,
            /// Flags that several entries share (one flag, a key of each entry that has it).
            #[command(flatten)]
            pub shared: $Shared,
            $(
                #[command(flatten)]
                #[allow(missing_docs)]
                pub $field: $Config,
            )+
        }

        impl $Flags {
            /// The keys of the flags that were given (the name's included).
            pub fn given_keys(&self) -> Vec<String> {
                let mut keys: Vec<String> = self.$key.iter().map(|_| $flag.to_string()).collect();
                keys.extend($crate::registry::to_map(&self.shared).into_iter().map(|(key, _)| key));
                $( keys.extend($crate::registry::to_map(&self.$field).into_iter().map(|(key, _)| key)); )+
                keys
            }

            /// Applies the flags that were given to `spec`: a new name starts from that entry's
            /// defaults, then the entry's own flags override. A flag of another entry is an error.
            pub fn apply(&self, spec: &mut $Spec) -> Result<(), $crate::registry::SpecError> {
                if let Some(name) = self.$key {
                    if spec.name() != name {
                        *spec = $Spec::default_of(name);
                    }
                }
                $(
                    match spec {
                        $Spec::$Variant(config) => *config = $crate::registry::overlay(config, &self.$field),
                        #[allow(unreachable_patterns)]
                        _ => {
                            if let Some((key, value)) = $crate::registry::to_map(&self.$field).into_iter().next() {
                                return Err($crate::registry::SpecError::new(
                                    $crate::registry::field_names::<$Config>().iter().find(|k| **k == key).copied().unwrap_or("?"),
                                    value.to_string(),
                                    format!("--{key} is a setting of the {} {}, but this run uses {}",
                                        <$Config as $crate::registry::$Trait>::NAME, $what, spec.name().as_str()),
                                ));
                            }
                        }
                    }
                )+
                // A shared flag goes through the flat form, for the entry in use when it has
                // that key; otherwise the error names every entry that has it.
                for (key, value) in $crate::registry::to_map(&self.shared) {
                    let name = spec.name();
                    let owners: Vec<&str> = [$( (<$Config as $crate::registry::$Trait>::NAME, $crate::registry::field_names::<$Config>()), )+]
                        .into_iter()
                        .filter(|(_, keys)| keys.contains(&key.as_str()))
                        .map(|(owner, _)| owner)
                        .collect();
                    let option = $crate::registry::field_names::<$Shared>().iter().find(|k| **k == key).copied().unwrap_or("?");
                    if !owners.contains(&name.as_str()) {
                        return Err($crate::registry::SpecError::new(option, value.to_string(), format!(
                            "--{key} is a setting of the {} {}{}, but this run uses {}",
                            owners.join(", "), $what, if owners.len() > 1 { "s" } else { "" }, name.as_str()
                        )));
                    }
                    let mut flat = spec.to_flat();
                    flat.insert(key, value);
                    *spec = $Spec::take_from_flat(&mut flat)?;
                }
                Ok(())
            }
        }
    };
}
pub(crate) use registry;

/// The object-safe part of [`RuleConfig`], implemented for every rule configuration.
pub trait BuildRule {
    /// See [`RuleConfig::build`].
    fn build(&self, world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError>;
    /// See [`RuleConfig::describe`].
    fn describe(&self) -> String;
    /// See [`RuleConfig::run_tag`].
    fn run_tag(&self) -> String;
    /// See [`RuleConfig::forced_period`].
    fn forced_period(&self) -> Option<u64>;
    /// See [`RuleConfig::default_period`].
    fn default_period(&self) -> Option<u64>;
    /// See [`RuleConfig::default_buffers`].
    fn default_buffers(&self) -> Option<crate::params::BufferPolicy>;
}

impl<T: RuleConfig> BuildRule for T {
    fn build(&self, world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError> {
        RuleConfig::build(self, world_size)
    }
    fn describe(&self) -> String {
        RuleConfig::describe(self)
    }
    fn run_tag(&self) -> String {
        RuleConfig::run_tag(self)
    }
    fn forced_period(&self) -> Option<u64> {
        RuleConfig::forced_period(self)
    }
    fn default_period(&self) -> Option<u64> {
        RuleConfig::default_period(self)
    }
    fn default_buffers(&self) -> Option<crate::params::BufferPolicy> {
        RuleConfig::default_buffers(self)
    }
}

/// The object-safe part of [`ScheduleConfig`], implemented for every schedule configuration.
pub trait BuildSchedule {
    /// See [`ScheduleConfig::build`].
    fn build(&self) -> Result<Box<dyn SyncSchedule>, SpecError>;
    /// See [`ScheduleConfig::describe`].
    fn describe(&self) -> String;
    /// See [`ScheduleConfig::run_tag`].
    fn run_tag(&self) -> String;
}

impl<T: ScheduleConfig> BuildSchedule for T {
    fn build(&self) -> Result<Box<dyn SyncSchedule>, SpecError> {
        ScheduleConfig::build(self)
    }
    fn describe(&self) -> String {
        ScheduleConfig::describe(self)
    }
    fn run_tag(&self) -> String {
        ScheduleConfig::run_tag(self)
    }
}

impl RuleSpec {
    /// The rule for `world_size` workers, after checking every setting against it.
    pub fn build(&self, world_size: usize) -> Result<Box<dyn CooperativeRule>, SpecError> {
        self.config().build(world_size)
    }

    /// A period the rule imposes on any schedule (synchronous SGD: 1).
    pub fn forced_period(&self) -> Option<u64> {
        self.config().forced_period()
    }

    /// The period the rule's paper uses, for a fixed schedule given no `--tau`.
    pub fn default_period(&self) -> Option<u64> {
        self.config().default_period()
    }

    /// What the rule's authors do with buffers when the run does not say (see
    /// [`RuleConfig::default_buffers`]).
    pub fn default_buffers(&self) -> Option<crate::params::BufferPolicy> {
        self.config().default_buffers()
    }

    /// `schedule` with this rule's default period written in, when it is the fixed schedule
    /// without a period of its own.
    pub fn with_default_period(&self, schedule: &ScheduleSpec) -> ScheduleSpec {
        match (schedule, self.default_period()) {
            (ScheduleSpec::Fixed(fixed), Some(tau)) if fixed.tau.is_none() => {
                ScheduleSpec::Fixed(crate::schedule::fixed::FixedConfig { tau: Some(tau), ..fixed.clone() })
            }
            _ => schedule.clone(),
        }
    }
}

impl ScheduleSpec {
    /// The schedule, after checking every setting.
    pub fn build(&self) -> Result<Box<dyn SyncSchedule>, SpecError> {
        self.config().build()
    }
}

/// The rule and schedule of a run, built together (a rule may impose its period).
pub fn build_pair(
    rule: &RuleSpec,
    schedule: &ScheduleSpec,
    world_size: usize,
) -> Result<(Box<dyn CooperativeRule>, Box<dyn SyncSchedule>), SpecError> {
    let built_rule = rule.build(world_size)?;
    let built_schedule = match rule.forced_period() {
        Some(period) => Box::new(
            crate::schedule::fixed::PeriodicSchedule::every(period)
                .map_err(|e| SpecError::new("tau", period.to_string(), e))?,
        ),
        None => rule.with_default_period(schedule).build()?,
    };
    Ok((built_rule, built_schedule))
}

/// `top`'s settings over `base`'s: every setting `top` has (not `None`) replaces `base`'s.
pub fn overlay<T: Serialize + DeserializeOwned>(base: &T, top: &T) -> T {
    let mut merged = to_map(base);
    merged.extend(to_map(top));
    serde_json::from_value(Value::Object(merged)).expect("a merge of two valid settings is valid")
}

/// A settings struct as a map without its unset (`None`) entries.
pub(crate) fn to_map<T: Serialize>(value: &T) -> Map<String, Value> {
    match serde_json::to_value(value).expect("settings serialize") {
        Value::Object(map) => map.into_iter().filter(|(_, v)| !v.is_null()).collect(),
        _ => Map::new(),
    }
}

/// The settings in `map`; a value of the wrong type is an error naming its key (tried alone),
/// anything else names `option`.
pub fn from_map<T: DeserializeOwned>(map: Map<String, Value>, option: &'static str) -> Result<T, SpecError> {
    serde_json::from_value(Value::Object(map.clone())).map_err(|error| {
        for (key, value) in &map {
            let alone = Map::from_iter([(key.clone(), value.clone())]);
            if let Err(error) = serde_json::from_value::<T>(Value::Object(alone))
                && let Some(name) = field_names::<T>().iter().find(|name| **name == key)
            {
                let shown = value.as_str().map_or_else(|| value.to_string(), str::to_string);
                return SpecError::new(name, shown, error);
            }
        }
        SpecError::new(option, Value::Object(map).to_string(), error)
    })
}

/// The field names of a settings struct, as serde reads them (kebab-case).
pub fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Capture {
        fields: Option<&'static [&'static str]>,
    }
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field names captured")
        }
    }
    impl std::error::Error for Stop {}
    impl serde::de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    impl<'de> serde::Deserializer<'de> for &mut Capture {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.fields = Some(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut capture = Capture { fields: None };
    let _ = T::deserialize(&mut capture);
    capture.fields.unwrap_or(&[])
}

/// Parses a kebab-case name of any serde enum (for flags whose type is a library enum).
pub fn serde_name<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_json::from_value(Value::String(text.to_string())).map_err(|e| e.to_string())
}

/// The kebab-case name serde gives a unit variant.
pub fn serde_name_of<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(name)) => name,
        other => format!("{other:?}"),
    }
}

/// Parses a whole number of at least 1.
pub fn at_least_one(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(v) if v >= 1 => Ok(v),
        Ok(_) => Err("must be at least 1".into()),
        Err(_) => Err(format!("'{text}' is not a whole number")),
    }
}

/// Parses a finite number (NaN and infinities are refused, never read as "unset").
pub fn finite_f64(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err(format!("'{text}' is not a finite number")),
        Err(_) => Err(format!("'{text}' is not a number")),
    }
}

/// Parses a finite number greater than 0.
pub fn positive_f64(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("'{text}' is not a positive number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{
        RuleFlags,
        averaging::{AveragingConfig, SynchronousConfig},
        elastic::ElasticConfig,
        gossip::GossipConfig,
    };
    use crate::schedule::{ScheduleFlags, fixed::FixedConfig};
    use crate::topology::TopologySpec;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        rule: RuleFlags,
        #[command(flatten)]
        schedule: ScheduleFlags,
    }

    fn flat(text: &str) -> Map<String, Value> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn field_names_are_read_from_serde() {
        assert_eq!(field_names::<ElasticConfig>(), &["alpha", "anchors"]);
        assert_eq!(field_names::<GossipConfig>(), &["topology", "weights"]);
        assert_eq!(field_names::<FixedConfig>(), &["tau", "warmup-steps"]);
        assert_eq!(field_names::<AveragingConfig>(), &["compressor"]);
    }

    #[test]
    fn flat_tables_round_trip_and_name_foreign_settings() {
        let mut table = flat(r#"{"rule": "gossip", "topology": "torus", "lr": 0.1}"#);
        let spec = RuleSpec::take_from_flat(&mut table).unwrap();
        assert_eq!(spec, RuleSpec::Gossip(GossipConfig { topology: Some(TopologySpec::Torus), weights: None }));
        assert_eq!(table, flat(r#"{"lr": 0.1}"#), "other keys stay");
        let mut back = spec.resolved().to_flat();
        assert_eq!(back.remove("weights"), Some(Value::String("metropolis-hastings".into())));
        assert_eq!(RuleSpec::take_from_flat(&mut spec.to_flat()).unwrap(), spec);

        let error = RuleSpec::take_from_flat(&mut flat(r#"{"rule": "gossip", "alpha": 0.3}"#)).unwrap_err();
        assert_eq!(error.option, "alpha");
        assert!(error.reason.contains("setting of the elastic rule, but this run uses gossip"), "{error}");
        let error = RuleSpec::take_from_flat(&mut flat(r#"{"rule": "hexagon"}"#)).unwrap_err();
        assert_eq!((error.option, error.value.as_str()), ("rule", "hexagon"));
        assert_eq!(RuleSpec::take_from_flat(&mut Map::new()).unwrap(), RuleSpec::Average(AveragingConfig::default()));
    }

    #[test]
    fn flags_override_and_foreign_flags_are_errors() {
        let mut spec = RuleSpec::Elastic(ElasticConfig { alpha: Some(0.1), anchors: None });
        let cli = Cli::parse_from(["coop", "--alpha", "0.2"]);
        cli.rule.apply(&mut spec).unwrap();
        assert_eq!(spec, RuleSpec::Elastic(ElasticConfig { alpha: Some(0.2), anchors: None }));

        let cli = Cli::parse_from(["coop", "--rule", "gossip", "--topology", "exponential"]);
        cli.rule.apply(&mut spec).unwrap();
        assert_eq!(spec.describe(), "gossip on a exponential");

        let cli = Cli::parse_from(["coop", "--rule", "average", "--alpha", "0.2"]);
        let error = cli.rule.apply(&mut spec).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("--alpha is a setting of the elastic, elastic-overlap rules, but this run uses average"),
            "{error}"
        );

        let mut schedule = ScheduleSpec::default();
        let cli = Cli::parse_from(["coop", "--tau", "3", "--warmup-steps", "5"]);
        cli.schedule.apply(&mut schedule).unwrap();
        assert_eq!(schedule.run_tag(), "tau3");
        assert!(Cli::try_parse_from(["coop", "--tau", "0"]).unwrap_err().to_string().contains("must be at least 1"));
    }

    #[test]
    fn building_checks_settings_against_the_real_number_of_workers() {
        let elastic = RuleSpec::Elastic(ElasticConfig { alpha: Some(0.5), anchors: None });
        assert!(elastic.build(2).is_ok(), "α = 0.5 < 2/3 for two workers");
        let error = elastic.build(4).err().unwrap();
        assert_eq!(
            error.to_string(),
            "invalid value '0.5' for 'alpha': elastic averaging needs 0 < α < 0.400000 for m = 4 workers and v = 1 anchor(s) (the (m+v)x(m+v) mixing matrix is stable below 2/(m+1) with one anchor, below v/m with several), got α = 0.5"
        );
        let (_, mut schedule) = build_pair(&RuleSpec::Sync(SynchronousConfig {}), &ScheduleSpec::default(), 3).unwrap();
        assert_eq!(schedule.period(10), 1);
        let zero = ScheduleSpec::Fixed(FixedConfig { tau: Some(0), warmup_steps: None });
        assert_eq!(zero.build().err().unwrap().option, "tau");
        let _ = &mut schedule;
    }

    #[test]
    fn rules_build_with_their_schedules() {
        use crate::rules::MatrixForm;
        use crate::schedule::ScheduleSignal;
        use crate::topology::WeightRule;
        let at = |step| ScheduleSignal { step, ..ScheduleSignal::default() };
        let torus =
            |weights| RuleSpec::Gossip(GossipConfig { topology: Some(TopologySpec::Torus), weights: Some(weights) });
        let gossip = torus(WeightRule::MetropolisHastings);
        assert!(gossip.build(6).unwrap().mixing_matrix(6).is_some());
        assert_eq!(gossip.name().as_str(), "gossip");
        assert!(RuleSpec::Elastic(ElasticConfig { alpha: Some(0.9), anchors: None }).build(4).is_err());
        let error = torus(WeightRule::BestConstant).build(7).err().unwrap();
        assert!(error.reason.contains("7 workers cannot form a 2-D torus"), "{error}");
        let tau8 = ScheduleSpec::Fixed(FixedConfig { tau: Some(8), warmup_steps: None });
        let (_, mut sync) = build_pair(&RuleSpec::Sync(SynchronousConfig {}), &tau8, 4).unwrap();
        assert!(sync.is_sync_step(&at(1)) && sync.is_sync_step(&at(2)));
        let (_, mut local) = build_pair(&RuleSpec::default(), &tau8, 4).unwrap();
        assert!(!local.is_sync_step(&at(1)) && local.is_sync_step(&at(8)));
        let tau0 = ScheduleSpec::Fixed(FixedConfig { tau: Some(0), warmup_steps: None });
        assert!(build_pair(&RuleSpec::default(), &tau0, 4).is_err());
    }
}
