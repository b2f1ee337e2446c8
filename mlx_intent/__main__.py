from mlx_intent.cli.main import main

main()
