"""What every stage shares: the stage lifecycle, input identity, units of work, Ray start-up, the plan, the
console and progress."""
