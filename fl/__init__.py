"""tensorwire's federated-learning layer. It uses the transport only through `transport`'s public
API.

    fl.client      the Client API for training scripts: init, is_running, receive, send
                   (fl.client_core: FLClient; fl.client_settings: ClientSettings, exceptions)
    fl.model       FLModel and ParamsType (FULL / DIFF)
    fl.controller  the Controller API for server algorithms; fl.fedavg / fl.fedadam: FedAvg and
                   FedAdam, streaming, with job state that survives a restart (fl.job_state)
    fl.aggregation the pure streaming aggregator (sums in memory or a file, tensor by tensor);
                   fl.server_optimizers: the update rules (FedAvg, FedAdam)
    fl.model_file  the global model as a safetensors file: mmap'd views, written slice by slice
    fl.server      FLServer: clients, tasks, results;  fl.protocol: the FL messages
    fl.daemons     `tensorwire server` / `client`;  fl.config: their TOML/YAML configuration
    fl.demo        `tensorwire demo`;  fl.task: the generated training task
    fl.sizes       "1GiB" in flags and configs (pydantic ByteSize);  fl.rss: peak RSS probe
See docs/fl.md.
"""
