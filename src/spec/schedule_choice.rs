//! `parallelism.schedule`: `"auto"` or a schedule's name from the planner's table
//! (`plan::schedule::registry`), which also gives the OpenAPI enum its values.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};

use super::validate::SpecError;
use crate::plan::schedule::Schedule;
use crate::plan::schedule::ScheduleKind;
use crate::plan::schedule::registry;

/// `"auto"`: the planner picks; or one schedule by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScheduleChoice {
    #[default]
    Auto,
    /// A name from the schedule table.
    Named(&'static str),
}

const AUTO: &str = "auto";

impl ScheduleChoice {
    /// The choice of `kind`'s schedule.
    pub fn of(kind: ScheduleKind) -> Self {
        ScheduleChoice::Named(kind.schedule().name)
    }

    fn schedule(self) -> Option<&'static Schedule> {
        match self {
            ScheduleChoice::Auto => None,
            ScheduleChoice::Named(name) => registry::named(name),
        }
    }

    /// The schedule to plan with (`None`: the search picks), given the spec's
    /// `chunks_per_stage`: the knob of a schedule whose knob is its chunks per device, else
    /// it must be the schedule's own count. Refused by field where it does not fit.
    pub fn kind(self, chunks_per_stage: Option<usize>) -> Result<Option<ScheduleKind>, SpecError> {
        let field = "parallelism.chunks_per_stage";
        let Some(schedule) = self.schedule() else {
            return match chunks_per_stage {
                None => Ok(None),
                Some(_) => Err(SpecError::new(
                    field,
                    "with schedule \"auto\" the planner uses each schedule's own chunks per \
                     stage; name a schedule to set it (as \"interleaved\"), or leave it out",
                )),
            };
        };
        let default = schedule.default_kind();
        let Some(n) = chunks_per_stage else {
            return Ok(Some(default));
        };
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        match &schedule.knob {
            Some(knob) if knob.is_chunks_per_device => Ok(Some((schedule.kind)(n))),
            _ if n == default.chunks_per_device() => Ok(Some(default)),
            _ => Err(SpecError::new(
                field,
                format!(
                    "{} holds {} chunk(s) per stage, not {n}; use {}, or leave it out",
                    schedule.name,
                    default.chunks_per_device(),
                    default.chunks_per_device()
                ),
            )),
        }
    }
}

impl fmt::Display for ScheduleChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScheduleChoice::Auto => f.write_str(AUTO),
            ScheduleChoice::Named(name) => f.write_str(name),
        }
    }
}

impl Serialize for ScheduleChoice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ScheduleChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Cow::<str>::deserialize(d)?;
        if text == AUTO {
            return Ok(ScheduleChoice::Auto);
        }
        match registry::named(&text) {
            Some(schedule) => Ok(ScheduleChoice::Named(schedule.name)),
            None => {
                let expected: Vec<String> = std::iter::once(AUTO)
                    .chain(registry::names())
                    .map(|n| format!("`{n}`"))
                    .collect();
                Err(serde::de::Error::custom(format!(
                    "unknown variant `{text}`, expected one of {}",
                    expected.join(", ")
                )))
            }
        }
    }
}

impl utoipa::PartialSchema for ScheduleChoice {
    fn schema() -> RefOr<Schema> {
        let values: Vec<&str> = std::iter::once(AUTO).chain(registry::names()).collect();
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .enum_values(Some(values))
            .into()
    }
}

impl utoipa::ToSchema for ScheduleChoice {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ScheduleChoice")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schedule_in_the_table_is_a_choice_and_round_trips() {
        for name in registry::names() {
            let json = format!("\"{name}\"");
            let choice: ScheduleChoice = serde_json::from_str(&json).unwrap();
            assert_eq!(choice, ScheduleChoice::Named(name));
            assert_eq!(serde_json::to_string(&choice).unwrap(), json);
        }
        let auto: ScheduleChoice = serde_json::from_str("\"auto\"").unwrap();
        assert_eq!(auto, ScheduleChoice::Auto);
        let err = serde_json::from_str::<ScheduleChoice>("\"zigzag\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown variant `zigzag`, expected one of `auto`, `gpipe`"),
            "{err}"
        );
    }

    #[test]
    fn chunks_per_stage_sets_a_knob_or_must_match_the_schedule() {
        let interleaved = ScheduleChoice::Named("interleaved");
        assert_eq!(
            interleaved.kind(Some(3)).unwrap(),
            Some(ScheduleKind::Interleaved {
                chunks_per_device: 3
            })
        );
        assert_eq!(
            interleaved.kind(None).unwrap(),
            Some(ScheduleKind::Interleaved {
                chunks_per_device: 2
            })
        );
        let chronos = ScheduleChoice::Named("chronos");
        assert_eq!(
            chronos.kind(Some(2)).unwrap(),
            Some(ScheduleKind::Chronos { in_flight: 0 })
        );
        let err = chronos.kind(Some(3)).unwrap_err();
        assert_eq!(err.param, "parallelism.chunks_per_stage");
        assert!(err.message.contains("chronos holds 2"), "{}", err.message);
        assert!(ScheduleChoice::Named("1f1b").kind(Some(2)).is_err());
        assert!(ScheduleChoice::Auto.kind(Some(2)).is_err());
        assert_eq!(ScheduleChoice::Auto.kind(None).unwrap(), None);
    }
}
