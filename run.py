"""sepnet: python run.py {fit,validate,test,predict} [--config conf/...yaml] [--key value ...]"""

from sepnet.cli import main

if __name__ == "__main__":
    main()
