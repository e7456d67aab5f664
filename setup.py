from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = {}
exec((HERE / "llmwatch" / "__init__.py").read_text(encoding="utf-8"), VERSION)

setup(
    name="llmwatch",
    version=VERSION["__version__"],
    description="Cost, latency and error metrics for OpenAI calls, for Prometheus.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["llmwatch", "llmwatch.*"]),
    # data/prices.yaml links to config/prices.yaml, so the repository keeps
    # one copy; building the wheel copies the file's content.
    package_data={"llmwatch": ["data/prices.yaml", "py.typed"]},
    install_requires=[
        "aiohttp>=3.10,<4",
        "aiohttp-apigami>=0.9,<1",
        "marshmallow>=3.26,<4",
        "openai[aiohttp]>=3.50,<4",
        "prometheus-client>=0.21,<1",
        "python-dotenv>=1.0,<2",
        "PyYAML>=6.0,<7",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-aiohttp>=1.1",
        ],
        "dev": [
            "mypy>=1.13",
            "ruff>=0.8",
            "tox>=4",
            "types-PyYAML",
        ],
    },
    entry_points={"console_scripts": ["llmwatch = llmwatch.cli:main"]},
    classifiers=[
        "Framework :: AsyncIO",
        "Framework :: aiohttp",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Monitoring",
    ],
)
