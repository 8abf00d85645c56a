"""`ckd demo`: the end-to-end pipeline on the bundled digits data."""

import click


@click.command("demo")
@click.option("--out", default="demo_out", show_default=True, type=click.Path(),
              help="Folder for data, mentors, cache, runs, plots and the results table.")
@click.option("--seeds", default=3, show_default=True, help="Student seeds per method.")
@click.option("--progress/--no-progress", default=False, show_default=True,
              help="Per-epoch progress bars (the stage lines are always printed).")
@click.option("--students", "more_students", is_flag=True,
              help="Also train the students beyond CNNs (mamba_tiny, vit_tiny) with kd and "
              "classroom from the same cache (adds several minutes on 2 cores).")
@click.option("--features", is_flag=True,
              help="Cache the mentors' pooled features too and train fitnet, crd, tekap (F), "
              "tekap (F+L) and sdkd next to nokd, kd and classroom (paper) (in place of aver "
              "and classroom (official)).")
@click.option("--pose", is_flag=True,
              help="The 2D pose pipeline instead: a synthetic COCO-format keypoint set, 3 "
              "SimCC mentors, their rows cached over keyed views, students with nokd, kd, "
              "aver and classroom; a PCK/AP table and plot (out defaults to demo_pose).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch threads for every stage. The table's digits depend on it (and on "
              "the CPU's instruction set): the README's table is what 1 thread printed.")
def demo(out: str, seeds: int, progress: bool, more_students: bool, features: bool,
         pose: bool, threads: int) -> None:
    """Prepare digits, train 4 mentors, cache all views, train students, report. Rerun
    into the same --out, it reuses what the earlier run finished."""
    if pose:
        from ckd.pose.demo import PoseDemoPlan, run_pose_demo  # noqa: PLC0415

        run_pose_demo("demo_pose" if out == "demo_out" else out,
                      PoseDemoPlan(seeds=tuple(range(seeds))), progress=progress)
        return
    from ckd.demo import DemoPlan, run_demo  # noqa: PLC0415

    extra = ("mamba_tiny", "vit_tiny") if more_students else ()
    seeds_ = tuple(range(seeds))
    plan = (DemoPlan.with_features(seeds=seeds_, more_students=extra, threads=threads)
            if features else DemoPlan(seeds=seeds_, more_students=extra, threads=threads))
    run_demo(out, plan, progress=progress)


commands = [demo]
