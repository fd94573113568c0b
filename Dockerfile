# The consumer service image: `svd-consumer run`, configured by SVD_* environment variables.
# Built by docker-compose.yml (`docker compose up --build`); nothing here needs the dev tools.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, unprivileged uid: the service needs no root, only /dev/shm (sized by compose's shm_size).
RUN useradd --create-home --uid 10001 --user-group svd

WORKDIR /opt/svd
# The packages pyproject.toml's [tool.setuptools.packages.find] names, and the files it reads.
# numpy and scipy come as manylinux wheels: no compiler needed.
COPY pyproject.toml README.md ./
COPY schemas/ schemas/
COPY consumer/ consumer/
COPY producer_sdk/ producer_sdk/
COPY objectstore/ objectstore/
COPY localkafka/ localkafka/
COPY localstore/ localstore/
COPY demo/ demo/
COPY bench/ bench/
RUN pip install . && rm -rf /opt/svd/build

USER svd
WORKDIR /home/svd
# Listen for Prometheus on every interface of the container (the default is loopback only).
ENV SVD_METRICS_HOST=0.0.0.0 \
    SVD_METRICS_PORT=9400
EXPOSE 9400

CMD ["svd-consumer", "run"]
