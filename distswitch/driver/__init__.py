"""The driver: the process a user starts (`distswitch train` / `tune`, or a `ray job submit`
entrypoint). It validates what it can before Ray starts, joins or starts the cluster, runs a
TorchTrainer (or a Tune search of them) and collects the results into out_dir and MLflow. It never
imports the worker: it is handed the worker's entry function (the CLI passes
`distswitch.worker.ray_main`) and meets the workers in the checkpoint format and the loop config."""
